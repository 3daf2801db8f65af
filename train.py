"""
Train GPT-2 or one of its dynamic-depth variants.

    python train.py                                   # tiny char-level GPT, Tiny Shakespeare, CPU
    python train.py --variant mod --capacity 0.125    # Mixture-of-Depths, into out-mod/
    python train.py config/train_shakespeare_char.py --max_iters=2000
    python train.py --init_from=resume --out_dir=out-mod   # continue a stopped run exactly
    torchrun --standalone --nproc_per_node=8 train.py config/train_gpt2.py

Flags are the fields of TrainConfig (train_config.py) plus those of the chosen variant's settings
(`--key value` or `--key=value`); a config file holds `key = value` lines. A variant may set
its own defaults for training flags (train_defaults; printed at start, flags win). The models
speak the contract of variants.py, so nothing here depends on which variant runs.
"""

import gc
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import (dense_model, file_sha256, is_gpt2_weights, load_model, pick_device,
                        read_checkpoint, save_checkpoint)
from configurator import fail
from dataset import Batches, ensure_data, vocab_size
from model import GPTConfig
from train_config import DTYPES, TrainConfig, check_out_dir, parse_args, resume_settings
from variants import VARIANTS

# --- model -----------------------------------------------------------------------------------
def build_model(cfg, settings):
    """The model to train: from scratch, or a variant built from a trained dense model."""
    cls, _ = VARIANTS[cfg.variant]
    if cfg.init_from == "scratch":
        if cls.starts_from_dense:
            fail(f"--variant {cfg.variant} tunes a trained model: "
                 f"pass --init_from <checkpoint | gpt2>")
        config = GPTConfig(block_size=cfg.block_size or 64, vocab_size=vocab_size(cfg.dataset),
                           n_layer=cfg.n_layer,
                           n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=cfg.bias)
        try:
            return cls(config, settings)
        except ValueError as e:  # a setting the model's size cannot hold (--route_every > n_layer)
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
    """Where the frozen part of a partly-trained model lives (its checkpoint keeps the rest)."""
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
            print("\nCtrl-C: stopping after this iteration and saving "
                  "(Ctrl-C again to stop without saving)",
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


def start_processes(cfg):
    """(ddp, rank, world size, device): one process, or this one of torchrun's."""
    ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun?
    rank, world = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if cfg.gradient_accumulation_steps % world:
        fail(f"--gradient_accumulation_steps {cfg.gradient_accumulation_steps} must be a multiple "
             f"of the {world} processes (each process takes an equal share of the micro-batches)")
    device = pick_device(cfg.device)
    if ddp:
        dist.init_process_group(backend=cfg.backend if cfg.backend != "auto" else
                                ("nccl" if device.startswith("cuda") else "gloo"))
        if device.startswith("cuda"):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
    return ddp, rank, world, device


def precision(cfg, device_type):
    """(dtype name, autocast context) for --dtype on this device."""
    dtype = cfg.dtype
    if dtype == "auto":
        bf16 = device_type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = "bfloat16" if bf16 else "float32"
    if dtype == "float32":
        return dtype, nullcontext()
    return dtype, torch.autocast(device_type=device_type, dtype=DTYPES[dtype])


def prepare_data(cfg, ddp, rank):
    """Rank 0 checks (or prepares) the dataset while the others wait."""
    if rank == 0:
        ensure_data(cfg.dataset)
    if ddp:
        dist.barrier()


def model_to_train(cfg, settings, ckpt, ddp, rank):
    """The model, loaded from `ckpt` or built. A new model needs the data's vocabulary first; a
    loaded one is read first, so that a bad checkpoint is reported before any download."""
    if cfg.init_from == "scratch":
        prepare_data(cfg, ddp, rank)
    model = load_model(cfg.out_dir, ckpt)[0] if ckpt else build_model(cfg, settings)
    if cfg.init_from != "scratch":
        prepare_data(cfg, ddp, rank)
    return model


def setup(cfg, settings, ckpt):
    """Processes, device, model, data and optimizer; restored from `ckpt` when resuming."""
    ddp, rank, world, device = start_processes(cfg)
    torch.manual_seed(cfg.seed)
    device_type = "cuda" if device.startswith("cuda") else device
    dtype, autocast = precision(cfg, device_type)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = model_to_train(cfg, settings, ckpt, ddp, rank).to(device)
    batches = Batches(cfg.dataset, model.config.block_size, cfg.batch_size, device, cfg.seed,
                      cfg.train_samples)
    batches.check_vocabulary(model.config.vocab_size)
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                           (cfg.beta1, cfg.beta2), device_type)
    scaler = torch.amp.GradScaler(device_type, enabled=(dtype == "float16"))
    run = Run(cfg, settings, model, model, optimizer, scaler, batches, autocast, ddp, rank,
              cfg.gradient_accumulation_steps // world)
    if ckpt:  # resume exactly where the checkpoint stopped
        optimizer.load_state_dict(ckpt["optimizer"])
        run.iter_num, run.best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        run.base = ckpt.get("base")
        run.saved = (run.iter_num, ckpt.get("val_loss", run.best_val_loss))
        torch.set_rng_state(ckpt["rng"]["torch"])
        batches.load_state(ckpt["rng"])
        batches.itos = ckpt.get("itos", batches.itos)  # the characters it was trained on
    elif model.starts_from_dense:
        run.base = base_pointer(cfg)
    compiled, why = compile_choice(cfg.compile, device_type)
    if compiled:
        run.model = torch.compile(model)
    if ddp:
        device_ids = [int(device.split(":")[1])] if device_type == "cuda" else None
        run.model = DDP(run.model, device_ids=device_ids,
                        find_unused_parameters=model.ddp_find_unused_parameters)
    if run.master:
        print(f"variant {cfg.variant}: {model.get_num_params() / 1e6:.2f}M parameters, context "
              f"{model.config.block_size}, {model.flops_per_token() / 1e6:.2f} MFLOPs/token "
              f"(training), device {device}, {dtype}")
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
        "optimizer": run.optimizer.state_dict(), "iter_num": run.iter_num,
        "best_val_loss": run.best_val_loss, "itos": run.batches.itos,
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
    """Evaluate, print, then (unless --eval_only) log and save when the rules say so. Returns
    the val loss."""
    metrics = evaluate(run.raw_model, run.batches, run.cfg, run.autocast)
    val_loss = metrics["val"]["loss"]
    shown = " ".join(f"{k} {v:.4f}" for k, v in metrics["val"].items() if k != "loss")
    print(f"step {run.iter_num}: train loss {metrics['train']['loss']:.4f}, "
          f"val loss {val_loss:.4f} {shown}")
    if run.cfg.eval_only:
        return val_loss
    with open(run.out / "log.jsonl", "a") as f:
        line = {"iter": run.iter_num, "train_seconds": train_seconds, **metrics}
        f.write(json.dumps(line) + "\n")
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
    kept = []
    if resuming and log.exists():
        kept = [line for line in log.read_text().splitlines()
                if json.loads(line)["iter"] <= run.iter_num]
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
            loss = run.raw_model.training_loss(lm_loss, aux)
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
    cfg = run.cfg
    tokens = cfg.gradient_accumulation_steps * cfg.batch_size * run.raw_model.config.block_size
    parts = [f"iter {run.iter_num}: loss {totals.pop('lm'):.4f}",
             *(f"{k} {v:.4f}" for k, v in totals.items()),
             f"time {dt * 1000:.1f}ms", f"{tokens / dt:,.0f} tok/s"]
    if torch.cuda.is_available():
        parts.append(f"mfu {100 * run.raw_model.estimate_mfu(tokens, dt):.1f}%")
    return ", ".join(parts)


def configure(argv):
    """(TrainConfig, variant settings, checkpoint to resume or None) from the command line."""
    cfg, settings, given = parse_args(argv, __doc__)
    if cfg.init_from == "resume":
        ckpt, _ = read_checkpoint(cfg.out_dir)
        return (*resume_settings(cfg, settings, given, ckpt), ckpt)
    if not cfg.eval_only:  # eval_only writes nothing
        check_out_dir(cfg)
    defaults = VARIANTS[cfg.variant][0].train_defaults(cfg)
    own = {k: getattr(cfg, k) for k in defaults if k not in given}
    if own and int(os.environ.get("RANK", 0)) == 0:
        print(f"--variant {cfg.variant} sets its own defaults (flags override them): "
              + " ".join(f"--{k}={v}" for k, v in own.items()))
    return cfg, settings, None


def main(argv):
    cfg, settings, ckpt = configure(argv)
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
    eval_seconds = 0.0  # kept out of the logged training time: variants compare at equal wall time
    try:
        while True:
            it = run.iter_num
            due = it % cfg.eval_interval == 0 or it == cfg.max_iters
            if run.master and it != resumed_at and due:
                eval_start = time.time()
                last_eval = (it, eval_log_save(run, eval_start - started - eval_seconds))
                eval_seconds += time.time() - eval_start
            if should_stop(run, it):
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
        save_at_exit(run, last_eval)
    finish(run)
    if run.stop.requested:
        raise SystemExit(130)


def should_stop(run, it):
    """At max_iters or after Ctrl-C; under DDP every rank stops at the same iteration."""
    stopping = torch.tensor(float(run.stop.requested or it >= run.cfg.max_iters))
    if run.ddp:
        dist.all_reduce(stopping, op=dist.ReduceOp.MAX)
    return bool(stopping.item())


def save_at_exit(run, last_eval):
    """After Ctrl-C keep what was trained (with its val loss if this iteration was evaluated);
    then say what is on disk."""
    if run.stop.requested and run.iter_num != (run.saved or (None,))[0]:
        save(run, last_eval[1] if last_eval and last_eval[0] == run.iter_num else None)
    if run.saved:
        shown = "not evaluated" if run.saved[1] is None else f"{run.saved[1]:.4f}"
        print(f"saved {run.out / 'ckpt.pt'}: iter {run.saved[0]}, val loss {shown}"
              + ("; --init_from=resume continues" if run.stop.requested else ""))


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
