"""
train.py's flags: TrainConfig (one field per flag), the chosen variant's own settings and
defaults, and what resuming a run may change.

    python train.py --variant mod --capacity 0.125 --max_iters=500

Flag values come from configurator.read_flags (command line and config files); the order is
TrainConfig's defaults, then the variant's train_defaults, then what the user gave.
"""

from dataclasses import dataclass, fields
from pathlib import Path

import torch

from configurator import build, check_output_folder, fail, parse_value, read_flags
from variants import VARIANTS, default_out_dir, owners, settings_fields

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TrainConfig:
    variant: str = "baseline"  # a name registered in variants.py: baseline | mod | mom | ...
    # I/O
    out_dir: str = ""  # "" = out for the baseline, out-<variant> for the others
    overwrite: bool = False  # a new run may replace the checkpoint already in out_dir
    eval_interval: int = 250  # iterations between evaluations (and checkpoints)
    log_interval: int = 10  # iterations between loss lines
    eval_iters: int = 20  # batches per split at each evaluation
    eval_only: bool = False  # evaluate once, print, write nothing
    always_save_checkpoint: bool = True  # save at every eval, not only when val loss improves
    init_from: str = "scratch"  # scratch | resume | gpt2 | gpt2-medium | ... | a checkpoint file
    # data
    dataset: str = "shakespeare_char"  # a folder of data/ holding train.bin and val.bin
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step, over all processes
    batch_size: int = 12  # sequences per micro-batch, per process
    block_size: int = 0  # context length; 0: 64 for a new model, else the loaded model's own
    train_samples: int = 0  # 0: random windows from all of train.bin; N: epochs over N windows
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
    dtype: str = "auto"  # auto (bfloat16 where supported, else float32) | float32 | bfloat16 | ...
    compile: str = "auto"  # torch.compile the model: auto (on CUDA only) | true | false
    backend: str = "auto"  # DDP backend: auto (nccl on CUDA, gloo on CPU) | nccl | gloo
    seed: int = 1337  # initialisation, data order and dropout

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown --variant {self.variant!r}; "
                             f"choose one of {', '.join(VARIANTS)}")
        self.out_dir = self.out_dir or default_out_dir(self.variant)
        for flag in ("eval_interval", "log_interval", "eval_iters", "batch_size",
                     "gradient_accumulation_steps", "n_layer", "n_head", "n_embd"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be at least 1, got {getattr(self, flag)}")
        for flag in ("max_iters", "warmup_iters", "lr_decay_iters", "block_size", "weight_decay",
                     "grad_clip", "min_lr", "train_samples"):
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag} must be >= 0, got {getattr(self, flag)}")
        if not self.learning_rate > 0:
            raise ValueError(f"--learning_rate must be > 0, got {self.learning_rate}")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n_head {self.n_head} must divide --n_embd {self.n_embd} "
                             f"(each head gets n_embd / n_head)")
        for flag in ("dropout", "beta1", "beta2"):
            if not 0 <= getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be in [0, 1), got {getattr(self, flag)}")
        if not 0 <= self.seed < 2**63:  # a signed 64-bit seed, also for the eval seed (+1)
            raise ValueError(f"--seed must be in [0, 2**63 - 1], got {self.seed}")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"--dtype must be auto, float32, bfloat16 or float16, "
                             f"got {self.dtype!r}")
        if isinstance(self.compile, bool):  # checkpoints stored True when it meant "on CUDA only"
            self.compile = "auto" if self.compile else "false"
        self.compile = self.compile.lower()
        if self.compile not in ("auto", "true", "false"):
            raise ValueError(f"--compile must be auto, true or false, got {self.compile!r}")


# Resuming continues a run as it was trained; only these may differ from the stored settings.
MAY_CHANGE_ON_RESUME = {"init_from", "out_dir", "overwrite", "max_iters", "lr_decay_iters",
                        "eval_interval", "log_interval", "eval_iters", "eval_only",
                        "always_save_checkpoint", "device", "compile", "backend"}


def parse_args(argv, usage=""):
    """argv -> (TrainConfig, variant settings or None, names of the flags given); -h prints
    usage and every flag, grouped."""
    groups = [("training", TrainConfig)] + [(f"--variant {name}", cls)
                                            for name, (_, cls) in VARIANTS.items() if cls]
    raw = read_flags(argv, usage, groups)
    variant = raw.get("variant", TrainConfig.variant)
    if variant not in VARIANTS:
        fail(f"unknown --variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    train_fields = {f.name: f for f in fields(TrainConfig)}
    variant_fields = settings_fields(variant)
    train_values, variant_values = {}, {}
    for key, value in raw.items():
        if key in train_fields:
            train_values[key] = parse_value(value, train_fields[key])
        elif key in variant_fields:
            variant_values[key] = parse_value(value, variant_fields[key])
        else:
            hint = f" (it belongs to --variant {owners(key)[0]})" if owners(key) else ""
            valid = ", ".join(sorted([*train_fields, *variant_fields]))
            fail(f"unknown flag --{key}{hint}. Valid flags for --variant {variant}: {valid}")
    settings_cls = VARIANTS[variant][1]
    settings = build(settings_cls, variant_values) if settings_cls else None
    cfg = build(TrainConfig, {**variant_defaults(variant, train_values), **train_values})
    # after the variant's own defaults; a resumed run keeps the rates it was trained with
    if cfg.decay_lr and cfg.min_lr > cfg.learning_rate and cfg.init_from != "resume":
        fail(f"--min_lr {cfg.min_lr} is above --learning_rate {cfg.learning_rate}: the decay "
             f"would raise the rate; pass a lower --min_lr (usually learning_rate / 10)")
    return cfg, settings, set(raw)


def variant_defaults(variant, given):
    """The variant's own defaults (its train_defaults) for the training flags not given."""
    cls = VARIANTS[variant][0]
    defaults = cls.train_defaults(build(TrainConfig, given))
    unknown = sorted(defaults.keys() - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ValueError(f"{cls.__name__}.train_defaults sets {unknown[0]!r}, not a train.py flag")
    return {k: v for k, v in defaults.items() if k not in given}


def resume_settings(cfg, settings, given, ckpt):
    """(TrainConfig, variant settings) of the stored run, with the few flags that may change
    taken from the command line (and printed). Any other flag given with a different value is
    refused by name."""
    names = {f.name for f in fields(TrainConfig)}
    stored = {k: v for k, v in ckpt.get("config", {}).items() if k in names}
    if stored.get("train_samples") == -1:  # older runs: -1 meant the variant's own default
        stored["train_samples"] = variant_defaults(ckpt["variant"], {}).get("train_samples", 0)
    stored_variant = ckpt.get("variant_args", {})
    if cfg.variant != ckpt["variant"] and "variant" in given:
        fail(f"{cfg.out_dir} holds a {ckpt['variant']} checkpoint, not --variant {cfg.variant}")
    if "block_size" in given and cfg.block_size != ckpt["model_args"]["block_size"]:
        fail(f"--block_size {cfg.block_size}: the run in {cfg.out_dir} was trained with context "
             f"{ckpt['model_args']['block_size']}; resume keeps it (start a new run to change it)")
    for key in sorted(given - MAY_CHANGE_ON_RESUME - {"variant", "block_size"}):
        mine = getattr(cfg, key) if key in stored else getattr(settings, key, None)
        theirs = stored.get(key, stored_variant.get(key))
        if (key in stored or key in stored_variant) and mine != theirs:
            fail(f"--{key}={mine} differs from the {theirs} the run in {cfg.out_dir} was trained "
                 f"with; resume continues a run as it was (start a new run with --out_dir to "
                 f"change it)")
    changed = {k: getattr(cfg, k) for k in given & MAY_CHANGE_ON_RESUME}
    restored = build(TrainConfig, {**stored, **changed, "variant": ckpt["variant"],
                                   "init_from": "resume", "out_dir": cfg.out_dir})
    if ckpt["iter_num"] >= restored.max_iters and not restored.eval_only:
        fail(f"--max_iters {restored.max_iters}: the checkpoint in {cfg.out_dir} is at iter "
             f"{ckpt['iter_num']} already; raise --max_iters to train on")
    for key in sorted(given & MAY_CHANGE_ON_RESUME - {"init_from", "out_dir"}):
        if key in stored and stored[key] != getattr(restored, key):
            print(f"resume: --{key} {stored[key]} -> {getattr(restored, key)}")
    settings_cls = VARIANTS[ckpt["variant"]][1]
    return restored, (build(settings_cls, stored_variant) if settings_cls else None)


def check_out_dir(cfg):
    """Refuse an --out_dir a new run cannot write, before any model or data is built: one
    holding a checkpoint (unless --overwrite), a file, or a place where no folder can be made."""
    out = Path(cfg.out_dir)
    if (out / "ckpt.pt").exists() and not cfg.overwrite:
        fail(f"{out} already holds a checkpoint: pick another --out_dir, continue it with "
             f"--init_from=resume, or pass --overwrite=True to replace it")
    check_output_folder("--out_dir", out)
