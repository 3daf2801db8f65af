"""
Train GPT-2 or one of its dynamic-depth variants.

    python train.py                                   # tiny char-level GPT on Tiny Shakespeare, CPU, minutes
    python train.py --variant mod --capacity 0.125    # Mixture-of-Depths
    python train.py config/train_shakespeare_char.py --max_iters=2000
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

Flags are the fields of TrainConfig below plus those of the chosen variant's config
(`--key value` or `--key=value`); a config file holds `key = value` lines.
"""

import ast
import dataclasses
import hashlib
import json
import math
import os
import pickle
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from mindskip import MindSkipConfig, MindSkipGPT
from mod import MoDConfig, MoDGPT
from model import GPT, GPTConfig
from mom import MoMConfig, MoMGPT

VARIANTS = {  # name -> (model class, its settings dataclass)
    "baseline": (GPT, None),
    "mod": (MoDGPT, MoDConfig),
    "mom": (MoMGPT, MoMConfig),
    "router_tuning": (MindSkipGPT, MindSkipConfig),
}


@dataclass
class TrainConfig:
    variant: str = "baseline"  # baseline | mod | mom | router_tuning
    # I/O
    out_dir: str = "out"
    eval_interval: int = 250
    log_interval: int = 10
    eval_iters: int = 20  # batches per split at each evaluation
    eval_only: bool = False  # evaluate once and exit
    always_save_checkpoint: bool = True  # save at every eval, not only when val loss improves
    init_from: str = "scratch"  # scratch | resume | gpt2 | gpt2-medium | ... | path to a checkpoint
    # data
    dataset: str = "shakespeare_char"  # a folder of data/ holding train.bin and val.bin
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step, over all processes
    batch_size: int = 12
    block_size: int = 0  # context length; 0: 64 for a new model, a trained model's own when starting from one
    # model (ignored when init_from loads one)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    # AdamW with warmup and cosine decay
    learning_rate: float = 1e-3
    max_iters: int = 2000
    weight_decay: float = 1e-1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # 0 disables clipping
    decay_lr: bool = True
    warmup_iters: int = 100
    lr_decay_iters: int = 2000  # usually = max_iters
    min_lr: float = 1e-4  # usually learning_rate / 10
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    dtype: str = "auto"  # auto (bfloat16 where supported, else float32) | float32 | bfloat16 | float16
    compile: bool = True  # torch.compile the model; only used on CUDA
    backend: str = "auto"  # DDP backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    seed: int = 1337


# --- flags -----------------------------------------------------------------------------------

def parse_value(text, field):
    """Turn a flag's text into the field's type, or raise a message naming the flag."""
    kind = field.type
    try:
        if kind is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        return kind(text)
    except ValueError:
        wanted = {bool: "true or false", int: "an integer", float: "a number"}.get(kind, kind.__name__)
        raise SystemExit(f"--{field.name} expects {wanted}, got {text!r}") from None


def read_config_file(path):
    """A config file is Python with `key = literal` lines only (nothing runs)."""
    try:
        tree = ast.parse(Path(path).read_text(), filename=str(path))
    except (OSError, SyntaxError) as e:
        raise SystemExit(f"cannot read config file {path}: {e}") from None
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            continue  # a docstring
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            raise SystemExit(f"{path}:{node.lineno}: config files hold only `key = value` lines")
        try:
            values[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            raise SystemExit(f"{path}:{node.lineno}: the value must be a literal") from None
    return values


def read_flags(argv):
    """`--key value`, `--key=value` and config files -> {key: text}, later ones winning."""
    raw = {}
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raw.update({k: str(v) for k, v in read_config_file(arg).items()})
            continue
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if not args or args[0].startswith("--"):
                raise SystemExit(f"--{key} needs a value")
            value = args.pop(0)
        raw[key] = value
    return raw


def parse_args(argv):
    """argv -> (TrainConfig, variant settings or None). Unknown or mistyped flags exit with a message."""
    raw = read_flags(argv)
    variant = raw.get("variant", "baseline")
    if variant not in VARIANTS:
        raise SystemExit(f"unknown --variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    settings_cls = VARIANTS[variant][1]
    train_fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    variant_fields = {f.name: f for f in dataclasses.fields(settings_cls)} if settings_cls else {}
    train_values, variant_values = {}, {}
    for key, value in raw.items():
        if key in train_fields:
            train_values[key] = parse_value(value, train_fields[key])
        elif key in variant_fields:
            variant_values[key] = parse_value(value, variant_fields[key])
        else:
            owners = [name for name, (_, cls) in VARIANTS.items()
                      if cls and key in {f.name for f in dataclasses.fields(cls)}]
            hint = f" (it belongs to --variant {owners[0]})" if owners else ""
            valid = ", ".join(sorted([*train_fields, *variant_fields]))
            raise SystemExit(f"unknown flag --{key}{hint}. Valid flags for --variant {variant}: {valid}")
    try:
        settings = settings_cls(**variant_values) if settings_cls else None
    except ValueError as e:
        raise SystemExit(str(e)) from None
    return TrainConfig(**train_values), settings


# --- data ------------------------------------------------------------------------------------

def data_dir(dataset):
    """A name under data/, or a path to any folder holding train.bin and val.bin."""
    return Path(dataset) if os.sep in dataset else Path(__file__).parent / "data" / dataset


def ensure_data(dataset):
    """Stop with instructions if the dataset has not been prepared (Shakespeare prepares itself)."""
    folder = data_dir(dataset)
    if (folder / "train.bin").exists() and (folder / "val.bin").exists():
        return
    if dataset == "shakespeare_char" and (folder / "prepare.py").exists():
        print("data/shakespeare_char is not prepared yet: preparing it now")
        import subprocess
        done = subprocess.run([sys.executable, str(folder / "prepare.py")])
        if done.returncode == 0:
            return
        raise SystemExit(1)
    raise SystemExit(
        f"dataset {dataset!r} is not prepared: {folder}/train.bin and val.bin are missing. "
        f"Run `python data/{dataset}/prepare.py` first (see README)."
    )


class Batches:
    """Random windows of a uint16 token file. The generator is shared by all processes so that
    every rank draws the same global batch and takes its own slice (DDP == one process)."""

    def __init__(self, dataset, block_size, batch_size, device, seed, limit_tokens=0):
        self.files = {s: data_dir(dataset) / f"{s}.bin" for s in ("train", "val")}
        self.block_size, self.batch_size, self.device = block_size, batch_size, device
        self.limit_tokens = limit_tokens  # train only on the first tokens (router-tuning's slice)
        self.generator = torch.Generator().manual_seed(seed)
        for split, path in self.files.items():
            n = len(self.tokens(split))
            if n <= block_size:
                raise SystemExit(f"{path} holds {n} tokens, fewer than block_size + 1 = {block_size + 1}")

    def tokens(self, split):
        data = np.memmap(self.files[split], dtype=np.uint16, mode="r")  # reopen: memmaps leak
        if split == "train" and self.limit_tokens:
            data = data[: self.limit_tokens + 1]
        return data

    def offsets(self, split, n, generator=None):
        high = len(self.tokens(split)) - self.block_size
        return torch.randint(high, (n,), generator=generator or self.generator)

    def fetch(self, split, offsets):
        data = self.tokens(split)
        x = torch.stack([torch.from_numpy(data[i:i + self.block_size].astype(np.int64)) for i in offsets])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + self.block_size].astype(np.int64)) for i in offsets])
        if self.device.startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)


# --- checkpoints -----------------------------------------------------------------------------

def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(path, payload):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def read_checkpoint(path):
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.exists():
        raise SystemExit(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"{path} is not a readable nanodepth checkpoint ({e.__class__.__name__}: {e})") from None
    if not isinstance(ckpt, dict) or not {"model", "model_args", "variant"} <= ckpt.keys():
        raise SystemExit(f"{path} is not a nanodepth checkpoint (missing model, model_args or variant)")
    return ckpt, path


def load_model(path):
    """Rebuild any nanodepth checkpoint on the CPU: (model, checkpoint dict)."""
    ckpt, path = read_checkpoint(path)
    if ckpt["variant"] not in VARIANTS:
        raise SystemExit(f"{path} holds variant {ckpt['variant']!r}, unknown to this version of nanodepth")
    cls, settings_cls = VARIANTS[ckpt["variant"]]
    settings = settings_cls(**ckpt["variant_args"]) if settings_cls else None
    if "base" in ckpt:  # only part of the model was trained; the rest lives in the base checkpoint
        if "pretrained" in ckpt["base"]:
            base = GPT.from_pretrained(ckpt["base"]["pretrained"])
        else:
            base_path = Path(ckpt["base"]["path"])
            if not base_path.exists():
                raise SystemExit(f"{path} builds on {base_path}, which is missing")
            if file_sha256(base_path) != ckpt["base"]["sha256"]:
                raise SystemExit(f"{base_path} changed since {path} was trained on it (sha256 differs)")
            base, _ = load_model(base_path)
        if ckpt["model_args"]["block_size"] < base.config.block_size:
            base.crop_block_size(ckpt["model_args"]["block_size"])
        model = cls.from_dense(base, settings)
        _, unexpected = model.load_state_dict(ckpt["model"], strict=False)
        if unexpected:
            raise SystemExit(f"{path} does not fit its base model: unexpected tensors {unexpected[:3]}")
    else:
        config = GPTConfig(**ckpt["model_args"])
        model = cls(config, settings) if settings_cls else cls(config)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise SystemExit(f"{path} does not match its own settings: {e}") from None
    return model, ckpt


def dense_model(init_from, dropout):
    """A trained GPT-2 to start from: a hub name (gpt2*) or a baseline checkpoint."""
    if init_from.startswith("gpt2"):
        return GPT.from_pretrained(init_from, dropout=dropout)
    model, ckpt = load_model(init_from)
    if ckpt["variant"] != "baseline":
        raise SystemExit(f"--init_from {init_from} holds a {ckpt['variant']} model; a dense baseline is needed")
    return model


def build_model(cfg, settings):
    """The model to train and, when resuming, the checkpoint it came from."""
    cls, _ = VARIANTS[cfg.variant]
    if cfg.init_from == "resume":
        model, ckpt = load_model(cfg.out_dir)
        if ckpt["variant"] != cfg.variant:
            raise SystemExit(f"{cfg.out_dir} holds a {ckpt['variant']} checkpoint, not --variant {cfg.variant}")
        return model, ckpt
    if cfg.init_from == "scratch":
        if getattr(cls, "needs_dense_init", False):
            raise SystemExit(f"--variant {cfg.variant} tunes a trained model: pass --init_from <checkpoint | gpt2>")
        config = GPTConfig(block_size=cfg.block_size or 64, vocab_size=vocab_size(cfg.dataset), n_layer=cfg.n_layer,
                           n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)
        return (cls(config, settings) if settings else cls(config)), None
    dense = dense_model(cfg.init_from, cfg.dropout)
    if cfg.block_size > dense.config.block_size:
        raise SystemExit(f"--block_size {cfg.block_size} is longer than the {dense.config.block_size} tokens "
                         f"{cfg.init_from} was trained on")
    if cfg.block_size:
        dense.crop_block_size(cfg.block_size)  # e.g. finetune GPT-2 on shorter windows
    return (cls.from_dense(dense, settings) if settings else dense), None


def vocab_size(dataset):
    """Characters from meta.pkl, else GPT-2's vocabulary padded to a multiple of 64."""
    meta = data_dir(dataset) / "meta.pkl"
    if meta.exists():
        with open(meta, "rb") as f:
            return pickle.load(f)["vocab_size"]
    return 50304


# --- training --------------------------------------------------------------------------------

def learning_rate(cfg, it):
    """Linear warmup, then cosine decay to min_lr at lr_decay_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it > cfg.lr_decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def evaluate(model, batches, cfg, autocast):
    """Mean of model.evaluate over eval_iters batches per split. The same batches every time
    (a fixed generator), so successive evaluations compare like with like."""
    model.eval()
    results = {}
    for split in ("train", "val"):
        generator = torch.Generator().manual_seed(cfg.seed + 1)
        sums = {}
        for _ in range(cfg.eval_iters):
            X, Y = batches.fetch(split, batches.offsets(split, cfg.batch_size, generator))
            with autocast:
                for k, v in model.evaluate(X, Y).items():
                    sums[k] = sums.get(k, 0.0) + v
        results[split] = {k: v / cfg.eval_iters for k, v in sums.items()}
    model.train()
    return results


def pick_device(cfg):
    if cfg.device != "auto":
        return cfg.device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def main(argv):
    cfg, settings = parse_args(argv)
    ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun?
    device = pick_device(cfg)
    if ddp:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.startswith("cuda") else "gloo")
        dist.init_process_group(backend=backend)
        if device.startswith("cuda"):
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        if cfg.gradient_accumulation_steps % world:
            raise SystemExit(f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps} "
                             f"must be a multiple of the {world} processes")
    else:
        rank, world = 0, 1
    master = rank == 0
    micro_steps = cfg.gradient_accumulation_steps // world  # this process's share

    torch.manual_seed(cfg.seed)
    device_type = "cuda" if device.startswith("cuda") else device
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=ptdtype)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # a bad checkpoint is reported before any download; only a scratch model needs the data's vocabulary first
    if master and cfg.init_from == "scratch":
        ensure_data(cfg.dataset)
    if ddp:
        dist.barrier()
    model, ckpt = build_model(cfg, settings)
    if master:
        ensure_data(cfg.dataset)
    if ddp:
        dist.barrier()
    model.to(device)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * model.config.block_size
    limit = getattr(settings, "tune_samples", 0) * model.config.block_size
    batches = Batches(cfg.dataset, model.config.block_size, cfg.batch_size, device, cfg.seed, limit)
    if vocab_size(cfg.dataset) > model.config.vocab_size:
        raise SystemExit(f"dataset {cfg.dataset} has {vocab_size(cfg.dataset)} tokens, more than the "
                         f"model's vocabulary of {model.config.vocab_size}")
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    iter_num, best_val_loss = 0, float("inf")
    if ckpt is not None:  # resume exactly where the checkpoint stopped
        optimizer.load_state_dict(ckpt["optimizer"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        batches.generator.set_state(ckpt["rng"]["data"])
    raw_model = model
    if cfg.compile and device_type == "cuda":
        model = torch.compile(model)
    if ddp:
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None)
    base = ckpt.get("base") if ckpt else None  # where a partly-trained model's frozen weights live
    if getattr(raw_model, "needs_dense_init", False) and base is None:
        if cfg.init_from.startswith("gpt2"):
            base = {"pretrained": cfg.init_from}
        else:
            base_path = read_checkpoint(cfg.init_from)[1].resolve()
            base = {"path": str(base_path), "sha256": file_sha256(base_path)}

    def checkpoint(it):
        payload = {
            "model": raw_model.checkpoint_state_dict() if hasattr(raw_model, "checkpoint_state_dict") else raw_model.state_dict(),
            "model_args": asdict(raw_model.config),
            "variant": cfg.variant,
            "variant_args": asdict(settings) if settings else {},
            "optimizer": optimizer.state_dict(),
            "iter_num": it,
            "best_val_loss": best_val_loss,
            "config": asdict(cfg),
            "rng": {"torch": torch.get_rng_state(), "data": batches.generator.get_state()},
        }
        if base:
            payload["base"] = base
        save_checkpoint(Path(cfg.out_dir) / "ckpt.pt", payload)

    if master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        print(f"variant {cfg.variant}: {raw_model.get_num_params() / 1e6:.2f}M parameters, context {raw_model.config.block_size}, "
              f"{raw_model.flops_per_token() / 1e6:.2f} MFLOPs/token (training), device {device}, {dtype}")
    log_path = Path(cfg.out_dir) / "log.jsonl"
    resumed_at = iter_num if ckpt is not None else None
    t0 = started = time.time()
    eval_seconds = 0.0  # kept out of the logged training time, so that variants compare at equal wall time
    try:
        while True:
            if iter_num % cfg.eval_interval == 0 and iter_num != resumed_at and master:
                eval_start = time.time()
                metrics = evaluate(raw_model, batches, cfg, autocast)
                shown = " ".join(f"{k} {v:.4f}" for k, v in metrics["val"].items() if k != "loss")
                print(f"step {iter_num}: train loss {metrics['train']['loss']:.4f}, val loss {metrics['val']['loss']:.4f} {shown}")
                train_seconds = eval_start - started - eval_seconds  # this process's training time so far
                with open(log_path, "a") as f:
                    f.write(json.dumps({"iter": iter_num, "train_seconds": train_seconds, **metrics}) + "\n")
                if metrics["val"]["loss"] < best_val_loss or cfg.always_save_checkpoint:
                    best_val_loss = min(best_val_loss, metrics["val"]["loss"])
                    if iter_num > 0:
                        checkpoint(iter_num)
                eval_seconds += time.time() - eval_start
            if iter_num == 0 and cfg.eval_only:
                break
            if iter_num >= cfg.max_iters:
                break

            lr = learning_rate(cfg, iter_num)
            for group in optimizer.param_groups:
                group["lr"] = lr
            # every rank draws the same global batch and trains on its own micro-batches of it
            offsets = batches.offsets("train", cfg.gradient_accumulation_steps * cfg.batch_size)
            offsets = offsets.view(cfg.gradient_accumulation_steps, cfg.batch_size)[rank * micro_steps:(rank + 1) * micro_steps]
            aux_totals = {}
            for micro in range(micro_steps):
                X, Y = batches.fetch("train", offsets[micro])
                if ddp:  # sync gradients only on the last micro-step
                    model.require_backward_grad_sync = micro == micro_steps - 1
                with autocast:
                    _, lm_loss, aux = model(X, Y)
                    loss = lm_loss + sum(raw_model.loss_weights[k] * v for k, v in aux.items())
                if not torch.isfinite(loss):
                    raise SystemExit(f"loss became {loss.item()} at iter {iter_num}: stopping. The last good "
                                     f"checkpoint is in {cfg.out_dir}; try a lower --learning_rate")
                scaler.scale(loss / micro_steps).backward()
                aux_totals["lm"] = aux_totals.get("lm", 0.0) + lm_loss.item() / micro_steps
                for k, v in aux.items():
                    aux_totals[k] = aux_totals.get(k, 0.0) + v.item() / micro_steps
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

            t1 = time.time()
            dt, t0 = t1 - t0, t1
            if iter_num % cfg.log_interval == 0 and master:
                parts = [f"iter {iter_num}: loss {aux_totals.pop('lm'):.4f}"]
                parts += [f"{k} {v:.4f}" for k, v in aux_totals.items()]
                parts += [f"time {dt * 1000:.1f}ms", f"{tokens_per_iter / dt:,.0f} tok/s"]
                if device_type == "cuda":
                    parts.append(f"mfu {100 * raw_model.estimate_mfu(tokens_per_iter, dt):.1f}%")
                print(", ".join(parts))
            iter_num += 1

    except KeyboardInterrupt:  # keep what was trained: save, then stop
        if master and iter_num > 0:
            checkpoint(iter_num)
            print(f"\ninterrupted: saved iter {iter_num} to {Path(cfg.out_dir) / 'ckpt.pt'}; --init_from resume continues")
        raise SystemExit(130)
    if master and not cfg.eval_only and iter_num != resumed_at:
        checkpoint(iter_num)
        print(f"saved {Path(cfg.out_dir) / 'ckpt.pt'} (best val loss {best_val_loss:.4f})")
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
