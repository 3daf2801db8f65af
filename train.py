"""
Train GPT-2 or one of its dynamic-depth variants.

    python train.py                                   # tiny char-level GPT on Tiny Shakespeare, CPU, minutes
    python train.py --variant mod --capacity 0.125    # Mixture-of-Depths, into out-mod/
    python train.py config/train_shakespeare_char.py --max_iters=2000
    python train.py --init_from=resume --out_dir=out-mod   # continue a stopped run exactly
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

Flags are the fields of TrainConfig below plus those of the chosen variant's settings
(`--key value` or `--key=value`); a config file holds `key = value` lines. The models speak
the contract declared at the top of model.py, so nothing here depends on the variant.
"""

import gc
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import (VARIANTS, data_dir, dense_model, file_sha256, is_gpt2_weights, load_model, pick_device,
                        read_checkpoint, read_meta, save_checkpoint)
from configurator import build, fail, parse_value, read_flags
from model import GPTConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainConfig:
    variant: str = "baseline"  # baseline | mod | mom | router_tuning
    # I/O
    out_dir: str = ""  # "" = out for the baseline, out-<variant> for the others
    overwrite: bool = False  # a new run may replace the checkpoint already in out_dir
    eval_interval: int = 250  # iterations between evaluations (and checkpoints)
    log_interval: int = 10  # iterations between loss lines
    eval_iters: int = 20  # batches per split at each evaluation
    eval_only: bool = False  # evaluate once, print, write nothing
    always_save_checkpoint: bool = True  # save at every eval, not only when val loss improves
    init_from: str = "scratch"  # scratch | resume | gpt2 | gpt2-medium | ... | a checkpoint | GPT-2 safetensors
    # data
    dataset: str = "shakespeare_char"  # a folder of data/ holding train.bin and val.bin
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step, over all processes
    batch_size: int = 12  # sequences per micro-batch, per process
    block_size: int = 0  # context length; 0: 64 for a new model, a trained model's own when starting from one
    train_samples: int = -1  # -1: the variant's default; 0: random windows from all of train.bin; N: epochs over N windows
    # model (ignored when init_from loads one)
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # width of the residual stream
    dropout: float = 0.0  # share of activations zeroed in training (attention, MLP, embeddings)
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2
    # AdamW with warmup and cosine decay
    learning_rate: float = 1e-3  # peak learning rate, reached after warmup
    max_iters: int = 2000  # optimizer steps in all
    weight_decay: float = 1e-1  # on weight matrices and embeddings, not on biases or norms
    beta1: float = 0.9  # AdamW's first-moment decay
    beta2: float = 0.99  # AdamW's second-moment decay
    grad_clip: float = 1.0  # 0 disables clipping
    decay_lr: bool = True  # False: learning_rate throughout
    warmup_iters: int = 100  # linear warmup from near 0
    lr_decay_iters: int = 2000  # usually = max_iters
    min_lr: float = 1e-4  # usually learning_rate / 10
    # system
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    dtype: str = "auto"  # auto (bfloat16 where supported, else float32) | float32 | bfloat16 | float16
    compile: str = "auto"  # torch.compile the model: auto (on CUDA only) | true | false
    backend: str = "auto"  # DDP backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    seed: int = 1337  # initialisation, data order and dropout

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown --variant {self.variant!r}; choose one of {', '.join(VARIANTS)}")
        self.out_dir = self.out_dir or ("out" if self.variant == "baseline" else f"out-{self.variant}")
        positive = ("eval_interval", "log_interval", "eval_iters", "batch_size", "gradient_accumulation_steps",
                    "n_layer", "n_head", "n_embd")
        for flag in positive:
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be at least 1, got {getattr(self, flag)}")
        for flag in ("max_iters", "warmup_iters", "lr_decay_iters", "block_size", "weight_decay", "grad_clip",
                     "min_lr"):
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag} must be >= 0, got {getattr(self, flag)}")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n_head {self.n_head} must divide --n_embd {self.n_embd} (each head gets n_embd / n_head)")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if isinstance(self.compile, bool):  # checkpoints stored True when it meant "on CUDA only"
            self.compile = "auto" if self.compile else "false"
        self.compile = self.compile.lower()
        if self.compile not in ("auto", "true", "false"):
            raise ValueError(f"--compile must be auto, true or false, got {self.compile!r}")
        if self.train_samples < -1:
            raise ValueError(f"--train_samples must be -1 (the variant's default), 0 (all) or a count, got {self.train_samples}")


# Resuming continues a run as it was trained; only these may differ from the stored settings.
MAY_CHANGE_ON_RESUME = {"init_from", "out_dir", "overwrite", "max_iters", "lr_decay_iters", "eval_interval",
                        "log_interval", "eval_iters", "eval_only", "always_save_checkpoint", "device", "compile",
                        "backend"}


def parse_args(argv):
    """argv -> (TrainConfig, variant settings or None, names of the flags given)."""
    groups = [("training", TrainConfig)] + [(f"--variant {name}", cls)
                                            for name, (_, cls) in VARIANTS.items() if cls]
    raw = read_flags(argv, __doc__, groups)
    variant = raw.get("variant", "baseline")
    if variant not in VARIANTS:
        fail(f"unknown --variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    settings_cls = VARIANTS[variant][1]
    train_fields = {f.name: f for f in fields(TrainConfig)}
    variant_fields = {f.name: f for f in fields(settings_cls)} if settings_cls else {}
    train_values, variant_values = {}, {}
    for key, value in raw.items():
        if key in train_fields:
            train_values[key] = parse_value(value, train_fields[key])
        elif key in variant_fields:
            variant_values[key] = parse_value(value, variant_fields[key])
        else:
            owners = [name for name, (_, cls) in VARIANTS.items() if cls and key in {f.name for f in fields(cls)}]
            hint = f" (it belongs to --variant {owners[0]})" if owners else ""
            valid = ", ".join(sorted([*train_fields, *variant_fields]))
            fail(f"unknown flag --{key}{hint}. Valid flags for --variant {variant}: {valid}")
    settings = build(settings_cls, variant_values) if settings_cls else None
    return build(TrainConfig, train_values), settings, set(raw)


def resume_settings(cfg, settings, given, ckpt):
    """(TrainConfig, variant settings) of the stored run, with the few flags that may change
    taken from the command line (and printed). Any other flag given with a different value is
    refused by name."""
    stored = {k: v for k, v in ckpt.get("config", {}).items() if k in {f.name for f in fields(TrainConfig)}}
    stored_variant = ckpt.get("variant_args", {})
    if cfg.variant != ckpt["variant"] and "variant" in given:
        fail(f"{cfg.out_dir} holds a {ckpt['variant']} checkpoint, not --variant {cfg.variant}")
    if "block_size" in given and cfg.block_size != ckpt["model_args"]["block_size"]:
        fail(f"--block_size {cfg.block_size}: the run in {cfg.out_dir} was trained with context "
             f"{ckpt['model_args']['block_size']}; resume keeps it (start a new run to change it)")
    for key in sorted(given - MAY_CHANGE_ON_RESUME - {"variant", "block_size"}):
        mine = getattr(cfg, key) if key in stored else getattr(settings, key, None)
        theirs = stored.get(key, stored_variant.get(key))
        if key in stored or key in stored_variant:
            if mine != theirs:
                fail(f"--{key}={mine} differs from the {theirs} the run in {cfg.out_dir} was trained with; resume "
                     f"continues a run as it was (start a new run with --out_dir to change it)")
    restored = TrainConfig(**{**stored, **{k: getattr(cfg, k) for k in given & MAY_CHANGE_ON_RESUME},
                              "variant": ckpt["variant"], "init_from": "resume", "out_dir": cfg.out_dir})
    for key in sorted(given & MAY_CHANGE_ON_RESUME - {"init_from", "out_dir"}):
        if key in stored and stored[key] != getattr(restored, key):
            print(f"resume: --{key} {stored[key]} -> {getattr(restored, key)}")
    settings_cls = VARIANTS[ckpt["variant"]][1]
    return restored, (build(settings_cls, stored_variant) if settings_cls else None)


# --- data ------------------------------------------------------------------------------------

def ensure_data(dataset):
    """Stop with instructions if the dataset has not been prepared (Shakespeare prepares itself)."""
    folder = data_dir(dataset)
    if (folder / "train.bin").exists() and (folder / "val.bin").exists():
        return
    prepare = folder / "prepare.py"
    if dataset == "shakespeare_char" and prepare.exists():
        print("data/shakespeare_char is not prepared yet: preparing it now")
        import subprocess
        if subprocess.run([sys.executable, str(prepare)]).returncode != 0:
            raise SystemExit(2)  # prepare.py printed its own one-line reason
        return
    if prepare.exists():
        fail(f"--dataset {dataset}: {folder}/train.bin and val.bin are missing; run `python {prepare}` first")
    known = sorted(p.parent.name for p in (Path(__file__).parent / "data").glob("*/prepare.py"))
    fail(f"--dataset {dataset}: no {folder}/train.bin and val.bin; use one of {', '.join(known)} "
         f"or a folder holding train.bin and val.bin")


def vocab_size(dataset):
    """The dataset's characters (meta.json), else GPT-2's vocabulary padded to a multiple of 64."""
    meta = read_meta(data_dir(dataset))
    return meta["vocab_size"] if meta else 50304


class Batches:
    """Windows of a uint16 token file. The generator is shared by all processes so that every
    rank draws the same global batch and takes its own slice (DDP == one process). With
    `samples` > 0, training reads epochs over the first `samples` windows of train.bin, each
    window once per epoch (the official router-tuning recipe); else random windows anywhere."""

    def __init__(self, dataset, block_size, batch_size, device, seed, samples=0):
        self.files = {s: data_dir(dataset) / f"{s}.bin" for s in ("train", "val")}
        self.block_size, self.batch_size, self.device, self.samples = block_size, batch_size, device, samples
        self.generator = torch.Generator().manual_seed(seed)
        self.order, self.position = torch.empty(0, dtype=torch.long), 0  # this epoch's windows, next one
        for split, path in self.files.items():
            if path.stat().st_size % 2:
                fail(f"{path} has an odd number of bytes: not a file of uint16 tokens; prepare the dataset again")
            n = path.stat().st_size // 2
            if n <= block_size:
                fail(f"{path} holds {n} tokens, fewer than block_size + 1 = {block_size + 1}; "
                     f"use a smaller --block_size or more data")

    def tokens(self, split):
        return np.memmap(self.files[split], dtype=np.uint16, mode="r")  # reopen: memmaps leak

    def check_vocabulary(self, model_vocab):
        """Every token id must have an embedding (a strided sample of very large files)."""
        for split, path in self.files.items():
            data = self.tokens(split)
            top = int(data[:: max(1, len(data) // 50_000_000)].max())
            if top >= model_vocab:
                fail(f"{path} holds token id {top}, beyond the model's vocabulary of {model_vocab}: "
                     f"is --dataset the one this model was trained on?")

    def offsets(self, split, n, generator=None):
        if split == "train" and self.samples and generator is None:
            return self.epoch_offsets(n)
        high = len(self.tokens(split)) - self.block_size
        return torch.randint(high, (n,), generator=generator or self.generator)

    def epoch_offsets(self, n):
        windows = min(self.samples, (len(self.tokens("train")) - 1) // self.block_size)
        taken, count = [], 0
        while count < n:
            if self.position >= len(self.order):  # a new epoch: every window once, in a fresh order
                self.order, self.position = torch.randperm(windows, generator=self.generator), 0
            take = self.order[self.position:self.position + n - count]
            taken.append(take)
            count += len(take)
            self.position += len(take)
        return torch.cat(taken) * self.block_size

    def fetch(self, split, offsets):
        data = self.tokens(split)
        x = torch.stack([torch.from_numpy(data[i:i + self.block_size].astype(np.int64)) for i in offsets])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + self.block_size].astype(np.int64)) for i in offsets])
        if self.device.startswith("cuda"):
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def state(self):
        return {"data": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state(self, state):
        self.generator.set_state(state["data"])
        self.order, self.position = state.get("order", self.order), state.get("position", 0)


# --- model -----------------------------------------------------------------------------------

def build_model(cfg, settings):
    """The model to train: from scratch, or a variant built from a trained dense model."""
    cls, _ = VARIANTS[cfg.variant]
    if cfg.init_from == "scratch":
        if cls.starts_from_dense:
            fail(f"--variant {cfg.variant} tunes a trained model: pass --init_from <checkpoint | gpt2>")
        config = GPTConfig(block_size=cfg.block_size or 64, vocab_size=vocab_size(cfg.dataset), n_layer=cfg.n_layer,
                           n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)
        try:
            return cls(config, settings)
        except ValueError as e:  # a setting the model's size cannot hold, e.g. --route_every > n_layer
            fail(str(e))
    dense = dense_model(cfg.init_from, cfg.dropout)
    if cfg.block_size > dense.config.block_size:
        fail(f"--block_size {cfg.block_size} is longer than the {dense.config.block_size} tokens "
             f"{cfg.init_from} was trained on")
    if cfg.block_size:
        dense.crop_block_size(cfg.block_size)  # e.g. finetune GPT-2 on shorter windows
    try:
        return cls.from_dense(dense, settings)
    except ValueError as e:  # e.g. pools larger than the dense model's layers
        fail(f"--init_from {cfg.init_from}: {e}")


def base_pointer(cfg):
    """Where the frozen part of a partly-trained model lives (its checkpoint keeps only the rest)."""
    if is_gpt2_weights(cfg.init_from):
        return {"pretrained": cfg.init_from}
    path = read_checkpoint(cfg.init_from)[1].resolve()
    return {"path": str(path), "sha256": file_sha256(path)}


def all_finite(model):
    return all(torch.isfinite(p).all() for p in model.parameters())


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


class StopRequest:
    """Ctrl-C asks the loop to stop after the current iteration and save, so that resuming is
    exact and a save is never cut in half; a second Ctrl-C during training stops at once
    (without saving), and Ctrl-C during a save waits for it."""

    def __init__(self):
        self.requested, self.saving = False, False
        self.previous = signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.requested and not self.saving:
            raise KeyboardInterrupt
        if not self.requested:
            print("\nCtrl-C: stopping after this iteration and saving (Ctrl-C again to stop without saving)",
                  file=sys.stderr)
        self.requested = True

    def release(self):
        signal.signal(signal.SIGINT, self.previous)


@dataclass
class Run:
    """Everything one training run holds; setup() builds it, the loop below moves it on."""
    cfg: TrainConfig
    settings: object  # the variant's settings dataclass, or None
    model: torch.nn.Module  # what the loop calls: maybe compiled, maybe wrapped in DDP
    raw_model: torch.nn.Module  # the model itself: what is saved and evaluated
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batches: Batches
    autocast: object
    ddp: bool
    rank: int
    micro_steps: int  # this process's micro-batches per optimizer step
    base: dict = None  # where a partly-trained model's frozen weights live
    iter_num: int = 0
    best_val_loss: float = float("inf")
    saved: tuple = None  # (iter, val loss) of the checkpoint on disk
    stop: StopRequest = None

    @property
    def master(self):
        return self.rank == 0

    @property
    def out(self):
        return Path(self.cfg.out_dir)


def setup(cfg, settings, ckpt):
    """Processes, device, model, data and optimizer; restored from `ckpt` when resuming."""
    ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun?
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if cfg.gradient_accumulation_steps % world:
        fail(f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps} must be a multiple of the "
             f"{world} processes (each process takes an equal share of the micro-batches)")
    device = pick_device(cfg.device)
    if ddp:
        dist.init_process_group(backend=cfg.backend if cfg.backend != "auto" else
                                ("nccl" if device.startswith("cuda") else "gloo"))
        if device.startswith("cuda"):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    device_type = "cuda" if device.startswith("cuda") else device
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device_type == "cuda" and torch.cuda.is_bf16_supported() else "float32"
    autocast = nullcontext() if dtype == "float32" else torch.autocast(device_type=device_type, dtype=DTYPES[dtype])
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    # a bad checkpoint is reported before any download; only a scratch model needs the data's vocabulary first
    for step in ("before", "after"):
        if rank == 0 and (step == "after" or cfg.init_from == "scratch"):
            ensure_data(cfg.dataset)
        if ddp:
            dist.barrier()
        if step == "before":
            model = load_model(cfg.out_dir, ckpt)[0] if ckpt else build_model(cfg, settings)
    model.to(device)
    samples = cfg.train_samples if cfg.train_samples >= 0 else model.default_train_samples
    batches = Batches(cfg.dataset, model.config.block_size, cfg.batch_size, device, cfg.seed, samples)
    batches.check_vocabulary(model.config.vocab_size)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2), device_type)
    run = Run(cfg, settings, model, model, optimizer, torch.amp.GradScaler(device_type, enabled=(dtype == "float16")),
              batches, autocast, ddp, rank, cfg.gradient_accumulation_steps // world)
    if ckpt:  # resume exactly where the checkpoint stopped
        optimizer.load_state_dict(ckpt["optimizer"])
        run.iter_num, run.best_val_loss, run.base = ckpt["iter_num"], ckpt["best_val_loss"], ckpt.get("base")
        run.saved = (run.iter_num, ckpt.get("val_loss", run.best_val_loss))
        torch.set_rng_state(ckpt["rng"]["torch"])
        batches.load_state(ckpt["rng"])
    elif model.starts_from_dense:
        run.base = base_pointer(cfg)
    compiled, why = compile_choice(cfg.compile, device_type)
    if compiled:
        run.model = torch.compile(model)
    if ddp:
        run.model = DDP(run.model, device_ids=[int(device.split(":")[1])] if device_type == "cuda" else None,
                        find_unused_parameters=model.ddp_find_unused_parameters)
    if run.master:
        print(f"variant {cfg.variant}: {model.get_num_params() / 1e6:.2f}M parameters, context "
              f"{model.config.block_size}, {model.flops_per_token() / 1e6:.2f} MFLOPs/token (training), "
              f"device {device}, {dtype}")
        print(f"compile: {'on' if compiled else 'off'} ({why})")
    return run


def compile_choice(setting, device_type):
    """(torch.compile the model?, why, for the log) for --compile auto | true | false."""
    if setting != "auto":
        return setting == "true", f"--compile={setting}"
    if device_type == "cuda":
        return True, "--compile=auto compiles on CUDA"
    return False, "--compile=auto compiles on CUDA only; --compile=True compiles here too"


def save(run, val_loss=None):
    """Atomic, and never a model with non-finite weights or loss (val_loss None: not evaluated)."""
    if not ((val_loss is None or math.isfinite(val_loss)) and all_finite(run.raw_model)):
        print(f"not saving iter {run.iter_num}: val loss {val_loss} or the weights are not finite")
        return
    payload = {
        "model": run.raw_model.checkpoint_state_dict(), "model_args": asdict(run.raw_model.config),
        "variant": run.cfg.variant, "variant_args": asdict(run.settings) if run.settings else {},
        "optimizer": run.optimizer.state_dict(), "iter_num": run.iter_num, "best_val_loss": run.best_val_loss,
        "val_loss": val_loss, "config": asdict(run.cfg),
        "rng": {"torch": torch.get_rng_state(), **run.batches.state()},
    }
    if run.base:
        payload["base"] = run.base
    run.stop.saving = True
    save_checkpoint(run.out / "ckpt.pt", payload)
    run.stop.saving = False
    run.saved = (run.iter_num, val_loss)


def last_good(run):
    if run.saved:
        return f"the last good checkpoint is {run.out / 'ckpt.pt'} (iter {run.saved[0]})"
    return f"no checkpoint was saved in {run.out}"


def eval_log_save(run, train_seconds):
    """Evaluate, print, then (unless --eval_only) log and save when the rules say so. Returns the val loss."""
    metrics = evaluate(run.raw_model, run.batches, run.cfg, run.autocast)
    val_loss = metrics["val"]["loss"]
    shown = " ".join(f"{k} {v:.4f}" for k, v in metrics["val"].items() if k != "loss")
    print(f"step {run.iter_num}: train loss {metrics['train']['loss']:.4f}, val loss {val_loss:.4f} {shown}")
    if run.cfg.eval_only:
        return val_loss
    with open(run.out / "log.jsonl", "a") as f:
        f.write(json.dumps({"iter": run.iter_num, "train_seconds": train_seconds, **metrics}) + "\n")
    if run.iter_num > 0 and (val_loss < run.best_val_loss or run.cfg.always_save_checkpoint):
        run.best_val_loss = min(run.best_val_loss, val_loss)
        save(run, val_loss)
    return val_loss


def start_output(run, resuming):
    """The out_dir for this run: no stale temporary file; a new run starts a new log, a resumed
    one drops the lines logged after its checkpoint (a process killed between log and save)."""
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "ckpt.pt.tmp").unlink(missing_ok=True)  # left by a process killed while saving
    log = run.out / "log.jsonl"
    kept = [line for line in log.read_text().splitlines() if json.loads(line)["iter"] <= run.iter_num] \
        if resuming and log.exists() else []
    log.write_text("".join(line + "\n" for line in kept))


def train_step(run, lr):
    """One optimizer step over this process's micro-batches of the global batch. Returns the
    mean of each loss (LM and auxiliary) for the log line."""
    cfg = run.cfg
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    # every rank draws the same global batch and trains on its own micro-batches of it
    offsets = run.batches.offsets("train", cfg.gradient_accumulation_steps * cfg.batch_size)
    offsets = offsets.view(cfg.gradient_accumulation_steps, cfg.batch_size)
    offsets = offsets[run.rank * run.micro_steps:(run.rank + 1) * run.micro_steps]
    totals = {}
    for micro in range(run.micro_steps):
        X, Y = run.batches.fetch("train", offsets[micro])
        if run.ddp:  # sync gradients only on the last micro-step
            run.model.require_backward_grad_sync = micro == run.micro_steps - 1
        with run.autocast:
            _, lm_loss, aux = run.model(X, Y)
            loss = lm_loss + sum(run.raw_model.loss_weights[k] * v for k, v in aux.items())
        if not torch.isfinite(loss):
            print(f"loss became {loss.item()} at iter {run.iter_num}: stopping; {last_good(run)}. "
                  f"Try a lower --learning_rate", file=sys.stderr)
            raise SystemExit(1)
        run.scaler.scale(loss / run.micro_steps).backward()
        for k, v in {"lm": lm_loss, **aux}.items():
            totals[k] = totals.get(k, 0.0) + v.item() / run.micro_steps
    if cfg.grad_clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return totals


def log_line(run, totals, dt):
    tokens = run.cfg.gradient_accumulation_steps * run.cfg.batch_size * run.raw_model.config.block_size
    parts = [f"iter {run.iter_num}: loss {totals.pop('lm'):.4f}", *(f"{k} {v:.4f}" for k, v in totals.items()),
             f"time {dt * 1000:.1f}ms", f"{tokens / dt:,.0f} tok/s"]
    if torch.cuda.is_available():
        parts.append(f"mfu {100 * run.raw_model.estimate_mfu(tokens, dt):.1f}%")
    return ", ".join(parts)


def main(argv):
    cfg, settings, given = parse_args(argv)
    ckpt = None
    if cfg.init_from == "resume":
        ckpt, _ = read_checkpoint(cfg.out_dir)
        cfg, settings = resume_settings(cfg, settings, given, ckpt)
    elif (Path(cfg.out_dir) / "ckpt.pt").exists() and not cfg.overwrite and not cfg.eval_only:
        fail(f"{cfg.out_dir} already holds a checkpoint: pick another --out_dir, continue it with "
             f"--init_from=resume, or pass --overwrite=True to replace it")
    run = setup(cfg, settings, ckpt)
    if cfg.eval_only:  # evaluate what was loaded or built, print, write nothing
        if run.master:
            eval_log_save(run, 0.0)
        return finish(run)
    if run.master:
        start_output(run, resuming=ckpt is not None)
    run.stop = StopRequest()
    resumed_at, last_eval = run.iter_num if ckpt else None, None
    started = t0 = time.time()
    eval_seconds = 0.0  # kept out of the logged training time, so that variants compare at equal wall time
    try:
        while True:
            it = run.iter_num
            if run.master and it != resumed_at and (it % cfg.eval_interval == 0 or it == cfg.max_iters):
                eval_start = time.time()
                last_eval = (it, eval_log_save(run, eval_start - started - eval_seconds))
                eval_seconds += time.time() - eval_start
            stopping = torch.tensor(float(run.stop.requested or it >= cfg.max_iters))
            if run.ddp:  # every rank stops at the same iteration
                dist.all_reduce(stopping, op=dist.ReduceOp.MAX)
            if stopping.item():
                break
            totals = train_step(run, learning_rate(cfg, it))
            t1 = time.time()
            dt, t0 = t1 - t0, t1
            if it % cfg.log_interval == 0 and run.master:
                print(log_line(run, totals, dt))
            run.iter_num += 1
    except KeyboardInterrupt:
        print(f"\nstopped without saving iter {run.iter_num}; {last_good(run)}", file=sys.stderr)
        raise SystemExit(130)
    finally:
        run.stop.release()
    if run.master and run.iter_num != resumed_at:
        if run.stop.requested and run.iter_num != (run.saved or (None,))[0]:  # Ctrl-C: keep what was trained
            save(run, last_eval[1] if last_eval and last_eval[0] == run.iter_num else None)
        if run.saved:
            shown = "not evaluated" if run.saved[1] is None else f"{run.saved[1]:.4f}"
            print(f"saved {run.out / 'ckpt.pt'}: iter {run.saved[0]}, val loss {shown}"
                  + ("; --init_from=resume continues" if run.stop.requested else ""))
    finish(run)
    if run.stop.requested:
        raise SystemExit(130)


def finish(run):
    if run.ddp:
        dist.barrier()  # no rank tears the group down while another still uses it
        # DDP holds the process group: free it first, so that the group's gloo threads stop here
        # rather than at interpreter exit, where they sometimes aborted the process (SIGABRT)
        run.model = None
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
