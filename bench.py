"""
Measure each variant side by side, in one run, on random tokens.

    python bench.py                                          # tiny dims, CPU
    python bench.py --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=8 \\
                    --dtype=bfloat16 --compile=True          # GPT-2 124M dims on a GPU
    python bench.py --decode=True --max_new_tokens=500       # generation: cached vs uncached
    python bench.py --compare_kernels=True --variants=mod    # Triton kernels vs PyTorch
    python bench.py --checkpoints=out-base,out-tuned --prefill=True   # trained models, val set

This file holds the flags and picks the measurement; each measurement is a module of
benchmarks/: training (the default: tokens/s of a training step, FLOPs, memory, ratios to
the first variant registered), decode, checkpoints (--checkpoints, with --decode or
--prefill), kernel_compare and profiling (--profile). A variant's own flags (e.g. --capacity
for mod) apply to that variant's row.

Every model is measured in --repeats rounds, all variants interleaved within a round, so a busy
machine slows them alike; the median round counts, and the spread (max - min) / median of the
rounds is printed with a warning over 10%.
"""

import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from benchmarks.checkpoints import measure_checkpoints
from benchmarks.decode import bench_decode
from benchmarks.kernel_compare import compare_kernels
from benchmarks.training import bench_training, build
from checkpoint import pick_device
from configurator import build as build_settings, fail, parse_value, read_flags
from model import GPTConfig
from variants import VARIANTS, owners, settings_fields


@dataclass
class BenchConfig:
    variants: str = "all"  # comma-separated, or all
    n_layer: int = 4  # transformer blocks of every model (fresh weights, random tokens)
    n_head: int = 4  # attention heads per block
    n_embd: int = 128  # width of the residual stream
    block_size: int = 256  # tokens per sequence
    vocab_size: int = 50304  # GPT-2's, padded to a multiple of 64
    batch_size: int = 8  # sequences per training step
    steps: int = 10  # timed steps per variant and round, after warmup
    warmup: int = 3  # untimed steps first (allocations, compilation)
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    dtype: str = "float32"  # float32 | bfloat16
    compile: bool = False  # torch.compile every model, on any device (default: eager)
    decode: bool = False  # time generation instead of training
    max_new_tokens: int = 200  # with --decode: tokens generated per timed generation
    decode_batch: int = 1  # with --decode: sequences generated at once
    decode_repeats: int = 3  # timed generations per model; the fastest counts
    seed: int = 0  # the models' initialisation and the random tokens (0 .. 2**63 - 1)
    compare_kernels: bool = False  # variants with a `kernels` setting: Triton vs PyTorch
    checkpoints: str = ""  # comma-separated checkpoint dirs/files: measure these trained models
    prefill: bool = False  # with --checkpoints: val loss and forward time over the whole val set
    prompt_len: int = 16  # with --checkpoints --decode: prompt tokens from the start of val.bin
    repeats: int = 5  # timed rounds, the models interleaved in each; the median is reported
    csv: str = ""  # also write the rows to this CSV file (for plotting)
    profile: bool = False  # also print where each model's CPU time goes (not --compare_kernels)

    def __post_init__(self):
        for flag in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size",
                     "steps", "max_new_tokens", "decode_batch", "decode_repeats", "prompt_len",
                     "repeats"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be at least 1, got {getattr(self, flag)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n_head {self.n_head} must divide --n_embd {self.n_embd}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"--seed must be in [0, 2**63 - 1], got {self.seed}")


def parse_args(argv):
    """Bench flags plus any variant's flags: (BenchConfig, {variant: settings}), the first
    variant registered first (the reference of every ratio)."""
    own = {f.name: f for f in fields(BenchConfig)}
    values, per_variant = {}, {name: {} for name in VARIANTS}
    groups = [("bench", BenchConfig)] + [(f"{name}'s own (they apply to its row)", cls)
                                         for name, (_, cls) in VARIANTS.items() if cls]
    for key, text in read_flags(argv, __doc__, groups).items():
        if key in own:
            values[key] = parse_value(text, own[key])
            continue
        if not owners(key):
            fail(f"unknown flag --{key}. Valid: {', '.join(own)} and the variants' own flags")
        for name in owners(key):
            per_variant[name][key] = parse_value(text, settings_fields(name)[key])
    cfg = build_settings(BenchConfig, values)
    if cfg.prefill and not cfg.checkpoints:
        fail("--prefill=True measures trained models: pass --checkpoints=dir1,dir2,...")
    if cfg.profile and cfg.compare_kernels:
        fail("--profile=True does not apply to --compare_kernels=True: drop one of them")
    names = list(VARIANTS) if cfg.variants == "all" else cfg.variants.split(",")
    for name in names:
        if name not in VARIANTS:
            fail(f"--variants: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    reference = next(iter(VARIANTS))  # ratios need it, measured in the same run
    names = [reference] + [n for n in names if n != reference]
    settings = {}
    for name in names:
        cls = VARIANTS[name][1]
        settings[name] = build_settings(cls, per_variant[name]) if cls else None
    check_csv(cfg.csv)
    return cfg, settings


def check_csv(path):
    """--csv must be writable before minutes of measuring, yet nothing is written until then."""
    if not path:
        return
    folder = Path(path).parent
    if Path(path).is_dir():
        fail(f"--csv {path} is a folder: name a file, e.g. --csv={Path(path) / 'bench.csv'}")
    if not folder.is_dir():
        fail(f"--csv {path}: {folder} is not a folder; create it or pick another path")
    if not os.access(folder, os.W_OK) or (Path(path).exists() and not os.access(path, os.W_OK)):
        fail(f"--csv {path}: not writable here; pick another path")


def check_builds(settings, config):
    """Build every model once on the meta device (no memory, no time), so a setting the model's
    size cannot hold (--route_every past the last layer) stops here, before any measuring."""
    for name, variant_settings in settings.items():
        try:
            with torch.device("meta"):
                build(name, variant_settings, config, seed=0)
        except ValueError as e:
            fail(f"{name}: {e}")


def main(argv):
    cfg, settings = parse_args(argv)
    device = pick_device(cfg.device)
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    autocast = torch.autocast(device.split(":")[0], dtype=ptdtype, enabled=ptdtype != torch.float32)
    where = (torch.cuda.get_device_name() if device.startswith("cuda")
             else f"CPU, {torch.get_num_threads()} threads")
    if cfg.checkpoints:
        print(f"# trained checkpoints, device {where}, {cfg.dtype}")
        return measure_checkpoints(cfg, device, autocast)
    context = max(cfg.block_size, cfg.max_new_tokens + 1) if cfg.decode else cfg.block_size
    config = GPTConfig(block_size=context, vocab_size=cfg.vocab_size, n_layer=cfg.n_layer,
                       n_head=cfg.n_head, n_embd=cfg.n_embd)
    check_builds(settings, config)
    print(f"# {config.n_layer}x{config.n_head}x{config.n_embd}, vocab {config.vocab_size}, "
          f"device {where}, {cfg.dtype}, "
          f"{'compiled' if cfg.compile else 'eager (--compile=True compiles)'}")
    print("# FLOPs: training FLOPs per token, 6 x matmul weights + 12 d T per attended layer "
          "(DESIGN.md)")
    if cfg.compare_kernels:
        return compare_kernels(cfg, settings, config, device, autocast)
    if cfg.decode:
        return bench_decode(cfg, settings, config, device)
    return bench_training(cfg, settings, config, device, autocast)


if __name__ == "__main__":
    main(sys.argv[1:])
