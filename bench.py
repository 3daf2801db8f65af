"""
Measure each variant side by side, in one run, on random tokens.

    python bench.py                                          # tiny dims, CPU
    python bench.py --n_layer=12 --n_head=12 --n_embd=768 --block_size=1024 --batch_size=8 \\
                    --dtype=bfloat16 --compile=True          # GPT-2 124M dims on a GPU
    python bench.py --decode=True --max_new_tokens=500       # generation: cached vs uncached
    python bench.py --compare_kernels=True --variants=mod    # Triton kernels vs PyTorch, eager and compiled
    python bench.py --checkpoints=out-base,out-tuned --prefill=True   # trained models on their val set

Training rows: tokens/s of a full step (forward, backward, AdamW), training FLOPs per token
(DESIGN.md convention: 6 x matmul weights + 12 d T per attended layer, LM head counted,
embeddings and norms not), memory, and ratios to the baseline measured in the same run.
The FLOP ceiling is baseline FLOPs / variant FLOPs: the speed-up a perfect implementation
would reach. MoM's FLOPs are those of the routing its last timed step took (its routers decide
how many tokens pick SKIP); every other variant runs what its settings say. Memory is peak CUDA memory on a GPU, and the bytes autograd saved for the
backward pass (activations) on CPU, where no allocator peak is exposed.
A variant's own flags (e.g. --capacity for mod) apply to that variant's row.

Every model is measured in --repeats rounds, all variants interleaved within a round, so a busy
machine slows them alike; the median round counts, and the spread (max - min) / median of the
rounds is printed with a warning over 10%. --decode=True reports MoD at four capacities (its
untrained routers' bias set so that causal routing sends that share of tokens through) and, when
the transformers package is installed, its GPT2LMHeadModel.generate at the same dims.

With --checkpoints the rows are trained models instead (the first is the reference for the
ratios): --decode=True generates from a prompt taken from their val set, and --prefill=True
runs their whole val set through the model once (val loss, each mode's metrics, forward time).
"""

import csv
import dataclasses
import sys
import time
from dataclasses import dataclass, fields

import numpy as np
import torch

from checkpoint import VARIANTS, data_dir, load_model, pick_device
from configurator import build as build_settings, fail, import_optional, parse_value, read_flags
from model import GPT, GPTConfig
from mom import MoMGPT


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
    seed: int = 0  # the models' initialisation and the random tokens
    compare_kernels: bool = False  # mod only: routed block and step, Triton vs reference, eager vs compiled
    checkpoints: str = ""  # comma-separated checkpoint dirs/files: measure these trained models instead
    prefill: bool = False  # with --checkpoints: val loss and forward time over the whole val set
    prompt_len: int = 16  # with --checkpoints --decode: prompt tokens taken from the start of val.bin
    repeats: int = 5  # timed rounds, the variants interleaved in each (training, decode, prefill); median reported
    csv: str = ""  # also write the rows to this CSV file (for plotting)
    profile: bool = False  # also print where each model's CPU time goes (not with --compare_kernels)

    def __post_init__(self):
        for flag in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "steps",
                     "max_new_tokens", "decode_batch", "decode_repeats", "prompt_len", "repeats"):
            if getattr(self, flag) < 1:
                raise ValueError(f"--{flag} must be at least 1, got {getattr(self, flag)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n_head {self.n_head} must divide --n_embd {self.n_embd}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, got {self.dtype!r}")


def parse_args(argv):
    """Bench flags plus any variant's flags: {variant: settings}."""
    own = {f.name: f for f in fields(BenchConfig)}
    values, per_variant = {}, {name: {} for name in VARIANTS}
    groups = [("bench", BenchConfig)] + [(f"{name}'s own (they apply to its row)", cls)
                                         for name, (_, cls) in VARIANTS.items() if cls]
    for key, text in read_flags(argv, __doc__, groups).items():
        if key in own:
            values[key] = parse_value(text, own[key])
            continue
        owners = [n for n, (_, cls) in VARIANTS.items() if cls and key in {f.name for f in fields(cls)}]
        if not owners:
            fail(f"unknown flag --{key}. Valid: {', '.join(own)} and the variants' own flags")
        for name in owners:
            field = next(f for f in fields(VARIANTS[name][1]) if f.name == key)
            per_variant[name][key] = parse_value(text, field)
    cfg = build_settings(BenchConfig, values)
    if cfg.prefill and not cfg.checkpoints:
        fail("--prefill=True measures trained models: pass --checkpoints=dir1,dir2,...")
    if cfg.profile and cfg.compare_kernels:
        fail("--profile=True does not apply to --compare_kernels=True: drop one of them")
    names = list(VARIANTS) if cfg.variants == "all" else cfg.variants.split(",")
    for name in names:
        if name not in VARIANTS:
            fail(f"--variants: unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
    if names[0] != "baseline":
        names = ["baseline"] + [n for n in names if n != "baseline"]  # ratios need the baseline
    settings = {}
    for name in names:
        cls = VARIANTS[name][1]
        settings[name] = build_settings(cls, per_variant[name]) if cls else None
    return cfg, settings


def build(name, settings, config, seed):
    """A freshly initialised model of one variant (from a dense one where it needs that)."""
    torch.manual_seed(seed)
    cls = VARIANTS[name][0]
    if cls.starts_from_dense:
        return cls.from_dense(GPT(config), settings)
    return cls(config, settings)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def saved_activation_bytes(model, x, y):
    """Bytes autograd keeps for backward in one forward pass (counted once per tensor)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss, aux = model(x, y)
    return total


def training_step(model, cfg, device, autocast):
    """A function running one full training step (forward, backward, AdamW) on fixed random tokens."""
    # train.py's optimizer (fused AdamW on CPUs and GPUs): its per-parameter cost is part of the step
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.99), device.split(":")[0])
    step_model = torch.compile(model) if cfg.compile else model
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randint(model.config.vocab_size, (cfg.batch_size, cfg.block_size), generator=g).to(device)
    y = torch.randint(model.config.vocab_size, (cfg.batch_size, cfg.block_size), generator=g).to(device)

    def step():
        with autocast:
            _, loss, aux = step_model(x, y)
            loss = loss + sum(model.loss_weights[k] * v for k, v in aux.items())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, x, y


def median_seconds(run, n, device):
    """Median wall time of n calls of run()."""
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def time_training(model, cfg, device, autocast):
    """Median seconds of a full training step, and memory (see the module docstring)."""
    step, x, y = training_step(model, cfg, device, autocast)
    for _ in range(cfg.warmup):
        step()
    seconds = median_seconds(step, cfg.steps, device)
    if device.startswith("cuda"):
        return seconds, torch.cuda.max_memory_allocated()
    with autocast:
        return seconds, saved_activation_bytes(model, x, y)


def interleaved(runs, cfg):
    """{name: per-round values} for {name: run() -> value}: every round calls every run once, in
    turn, so that a machine busy with something else slows all of them alike."""
    rounds = {name: [] for name in runs}
    for _ in range(cfg.repeats):
        for name, run in runs.items():
            rounds[name].append(run())
    return rounds


def median_and_spread(values):
    """The median of the rounds and their spread, (max - min) / median."""
    mid = sorted(values)[len(values) // 2]
    return mid, (max(values) - min(values)) / mid


OP_KINDS = {  # torch.profiler op names -> what the time was spent on (the first match counts)
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm"),
    "attention": ("scaled_dot_product", "attention"),
    "moving rows": ("index", "cat", "copy_", "fill_", "zero", "scatter", "gather", "sort", "topk", "stack",
                    "where", "clone", "bincount", "nonzero", "_local_scalar_dense"),
}


def op_kind(event):
    """"optimizer" for anything run inside an optimizer step (on a CPU AdamW loops over the
    parameters with ordinary ops), else the OP_KINDS entry of its name, else "other"."""
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer."):
            return "optimizer"
        parent = parent.cpu_parent
    return next((kind for kind, names in OP_KINDS.items() if any(n in event.name for n in names)), "other")


def profile_shares(run):
    """Share of self CPU time per kind of op (optimizer, OP_KINDS, other) in one call of run(),
    the five ops that took the most, and how many ops it called (not counting ops called by ops)."""
    with torch.profiler.profile() as prof:
        run()
    events = prof.events()
    calls = sum(1 for e in events if e.name.startswith("aten::")
                and not (e.cpu_parent is not None and e.cpu_parent.name.startswith("aten::")))
    total = sum(e.self_cpu_time_total for e in events) or 1
    shares = dict.fromkeys(["optimizer", *OP_KINDS, "other"], 0.0)
    for e in events:
        shares[op_kind(e)] += e.self_cpu_time_total / total
    top = sorted(prof.key_averages(), key=lambda op: -op.self_cpu_time_total)[:5]
    return shares, ", ".join(f"{op.key} {op.self_cpu_time_total / total:.0%}" for op in top), calls


def print_profiles(runs, per):
    """--profile: one line per variant, where the CPU time of one call went, and its op calls per `per`."""
    print("# where the CPU time goes (torch.profiler, self time of one call): the AdamW step, matmuls, attention, "
          "moving rows (gathers, scatters, copies, sorts), other (elementwise ops, norms, views)")
    for name, run in runs.items():
        shares, top, calls = profile_shares(run)
        print(f"{name:<19} " + " ".join(f"{kind} {share:4.0%}" for kind, share in shares.items())
              + f"   {calls / per[1]:,.0f} ops per {per[0]}   top: {top}")


def warn_if_noisy(spreads):
    worst = max(spreads.values())
    if worst > 0.10:
        print(f"# warning: the machine is noisy, rounds spread by up to {worst:.0%} "
              f"({max(spreads, key=spreads.get)}); trust the ratios less, or run again with more --repeats")


def write_csv(path, rows):
    if path:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"# rows written to {path}")


def time_decode(model, cfg, device, use_cache, prompt=None):
    """(tokens/s, KV-cache bytes of the first context window) for greedy generation of
    max_new_tokens; past block_size, generate() restarts its cache, so that window is the peak."""
    if prompt is None:
        prompt = torch.zeros((cfg.decode_batch, 1), dtype=torch.long)
    prompt = prompt.to(device)
    model.generate(prompt, 4, temperature=0, use_cache=use_cache)  # warmup
    best = float("inf")
    for _ in range(cfg.decode_repeats):  # the fastest run: the least disturbed by the machine
        cache = model.new_cache() if use_cache else None
        sync(device)
        t0 = time.perf_counter()
        model.generate(prompt, cfg.max_new_tokens, temperature=0, use_cache=use_cache, cache=cache)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return cfg.decode_batch * cfg.max_new_tokens / best, (model.kv_cache_nbytes(cache) if use_cache else 0)


def val_tokens(ckpt):
    """The val split of the dataset a checkpoint was trained on, as int64 tokens."""
    folder = data_dir(ckpt["config"]["dataset"])
    if not (folder / "val.bin").exists():
        fail(f"{folder}/val.bin is missing: prepare the dataset the checkpoint was trained on")
    return torch.from_numpy(np.fromfile(folder / "val.bin", dtype=np.uint16).astype(np.int64))


@torch.no_grad()
def measure_checkpoints(cfg, device, autocast):
    """Trained models side by side: the decode table, or (--prefill) every whole val window once."""
    loaded = [(path, *load_model(path)) for path in cfg.checkpoints.split(",")]
    if cfg.decode:
        # past its context the cache restarts at every token (exact, but no faster): stay in one window
        context = min(model.config.block_size for _, model, _ in loaded)
        if cfg.prompt_len >= context:
            fail(f"--prompt_len {cfg.prompt_len} leaves no room in a {context}-token context")
        cfg = dataclasses.replace(cfg, max_new_tokens=min(cfg.max_new_tokens, context - cfg.prompt_len))
        print(f"# greedy decode of {cfg.max_new_tokens} tokens after a {cfg.prompt_len}-token val prompt "
              f"(one {context}-token context), batch {cfg.decode_batch}")
        print(f"{'checkpoint':<24}{'variant':<15}{'cached tok/s':>13}{'uncached tok/s':>15}{'speedup':>9}"
              f"{'KV bytes':>11}{'KV vs first':>12}")
        first_kv = None
        for path, model, ckpt in loaded:
            model.to(device).eval()
            prompt = val_tokens(ckpt)[:cfg.prompt_len].expand(cfg.decode_batch, -1)
            cached, kv = time_decode(model, cfg, device, True, prompt)
            uncached, _ = time_decode(model, cfg, device, False, prompt)
            first_kv = first_kv or kv
            print(f"{path:<23} {ckpt['variant']:<15}{cached:>13,.0f}{uncached:>15,.0f}{cached / uncached:>8.2f}x"
                  f"{kv:>11,}{kv / first_kv:>11.2f}x")
        return
    models = [model.to(device).eval() for _, model, _ in loaded]
    T = min(m.config.block_size for m in models)
    val = val_tokens(loaded[0][2])
    n = (len(val) - 1) // T
    x, y = val[:n * T].view(n, T), val[1:n * T + 1].view(n, T)
    batches = [(x[i:i + 32].to(device), y[i:i + 32].to(device)) for i in range(0, n, 32)]
    metrics = []
    for model in models:  # every metric averaged over windows
        with autocast:
            per_batch = [model.evaluate(xb, yb) for xb, yb in batches]
        metrics.append({k: sum(m[k] * len(xb) for m, (xb, _) in zip(per_batch, batches)) / n for k in per_batch[0]})

    def prefill(model):  # the forward pass without targets, over every val window
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            for xb, _ in batches:
                model(xb)
        sync(device)
        return time.perf_counter() - t0

    rounds = interleaved({i: lambda model=model: prefill(model) for i, model in enumerate(models)}, cfg)
    seconds = [median_and_spread(r) for r in rounds.values()]
    print(f"# prefill of {n} val windows x {T} tokens, batch 32, median of {cfg.repeats}")
    print(f"{'checkpoint':<24}{'variant':<15}{'val loss':>9}{'prefill s':>11}{'time x':>8}{'spread':>8}"
          "  other metrics")
    for (path, _, ckpt), m, (t, spread) in zip(loaded, metrics, seconds):
        other = " ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "loss")
        print(f"{path:<23} {ckpt['variant']:<15}{m['loss']:>9.4f}{t:>11.3f}{t / seconds[0][0]:>7.3f}x"
              f"{spread:>8.0%}  {other}")
    warn_if_noisy({path: spread for (path, _, _), (_, spread) in zip(loaded, seconds)})
    if cfg.profile:
        print_profiles({path: lambda model=model: prefill(model) for (path, _, _), model in zip(loaded, models)},
                       per=("batch of 32 windows", len(batches)))


def time_routed_block(block, cfg, device, autocast):
    """Median seconds of one routed block's forward and backward in top-k (training) mode."""
    run = torch.compile(block) if cfg.compile else block
    g = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch_size, cfg.block_size, block.router.in_features)
    x = torch.randn(shape, generator=g).to(device).requires_grad_()
    grad = torch.randn(shape, generator=g).to(device)
    times = []
    for i in range(cfg.warmup + cfg.steps):
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            out, _ = run(x, "topk")
        out.backward(grad)
        sync(device)
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def compare_kernels(cfg, settings, config, device, autocast):
    """MoD's routed-block forward+backward and its whole training step with the Triton kernels
    (eager and compiled) vs the PyTorch reference (eager and compiled), same run, same shapes.
    The baseline step, eager and compiled, turns each MoD step into a speed-up and a fraction
    of MoD's FLOP ceiling (baseline FLOPs / MoD FLOPs, DESIGN.md convention)."""
    mod_settings = settings.get("mod") or VARIANTS["mod"][1]()
    baseline = {}
    for compiled in (False, True):
        model = build("baseline", None, config, cfg.seed).to(device)
        baseline[compiled], _ = time_training(model, dataclasses.replace(cfg, compile=compiled), device, autocast)
        del model
    on_gpu = device.startswith("cuda")
    print(f"# MoD capacity {mod_settings.capacity}, batch {cfg.batch_size} x {cfg.block_size}, median of {cfg.steps}"
          f"{'' if on_gpu else '; no GPU: the triton rows run the reference'}")
    print(f"{'implementation':<18}{'block ms':>10}{'step ms':>10}{'speed x':>9}{'FLOP ceil':>11}{'of ceil':>9}")
    for name, kernels, compiled in [("triton", "triton", False), ("torch", "torch", False),
                                    ("triton compiled", "triton", True), ("torch compiled", "torch", True)]:
        model = build("mod", dataclasses.replace(mod_settings, kernels=kernels), config, cfg.seed).to(device)
        run_cfg = dataclasses.replace(cfg, compile=compiled)
        block_s = time_routed_block(next(iter(model.routed_blocks().values())), run_cfg, device, autocast)
        step_s, _ = time_training(model, run_cfg, device, autocast)
        speed, ceiling = baseline[compiled] / step_s, model.flop_ceiling(cfg.block_size)
        print(f"{name:<18}{block_s * 1e3:>10.2f}{step_s * 1e3:>10.2f}{speed:>8.2f}x{ceiling:>10.2f}x{speed / ceiling:>8.0%}")
        del model


def main(argv):
    cfg, settings = parse_args(argv)
    device = pick_device(cfg.device)
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    autocast = torch.autocast(device.split(":")[0], dtype=ptdtype, enabled=ptdtype != torch.float32)
    where = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    if cfg.checkpoints:
        print(f"# trained checkpoints, device {where}, {cfg.dtype}")
        return measure_checkpoints(cfg, device, autocast)
    config = GPTConfig(block_size=cfg.block_size if not cfg.decode else max(cfg.block_size, cfg.max_new_tokens + 1),
                       vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    print(f"# {config.n_layer}x{config.n_head}x{config.n_embd}, vocab {config.vocab_size}, device {where}, {cfg.dtype}"
          f"{', compiled' if cfg.compile else ', eager (--compile=True compiles)'}")
    print("# FLOPs: training FLOPs per token, 6 x matmul weights + 12 d T per attended layer (DESIGN.md)")
    if cfg.compare_kernels:
        return compare_kernels(cfg, settings, config, device, autocast)
    if cfg.decode:
        return bench_decode(cfg, settings, config, device)
    return bench_training(cfg, settings, config, device, autocast)


def step_flops_per_token(model, T):
    """Training FLOPs per token of the step just timed. MoM's untrained routers send some tokens
    to SKIP, so its ceiling (no SKIP) would understate what a perfect implementation could reach:
    count the routing its last step took instead."""
    if isinstance(model, MoMGPT):
        return model.routing_flops_per_token(model.last_routing)
    return model.flops_per_token(T)


def bench_training(cfg, settings, config, device, autocast):
    """One row per variant: tokens/s of a training step, FLOPs, memory, ratios to the baseline."""
    models = {name: build(name, vs, config, cfg.seed).to(device) for name, vs in settings.items()}
    memory, steps = {}, {}
    for name, model in models.items():
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        _, memory[name] = time_training(model, dataclasses.replace(cfg, steps=1), device, autocast)
        step = training_step(model, cfg, device, autocast)[0]
        steps[name] = lambda step=step: median_seconds(step, cfg.steps, device)
    seconds = {name: median_and_spread(r) for name, r in interleaved(steps, cfg).items()}
    print(f"# training step, batch {cfg.batch_size} x {cfg.block_size} tokens, median of {cfg.repeats} "
          f"interleaved rounds of {cfg.steps} steps")
    mem_name = "peak MiB" if device.startswith("cuda") else "act. MiB"
    print(f"{'variant':<16}{'tok/s':>10}{'MFLOPs/tok':>12}{mem_name:>10}{'speed x':>9}{'FLOP ceil':>11}"
          f"{'of ceil':>9}{'mem x':>8}{'spread':>8}")
    rows, base = [], None
    for name, model in models.items():
        flops = step_flops_per_token(model, cfg.block_size)
        row = dict(variant=name, tok_s=cfg.batch_size * cfg.block_size / seconds[name][0], flops_per_token=flops,
                   memory_bytes=memory[name], spread=seconds[name][1])
        base = base or row
        row.update(speed=row["tok_s"] / base["tok_s"], flop_ceiling=base["flops_per_token"] / flops,
                   memory_ratio=row["memory_bytes"] / base["memory_bytes"])
        rows.append(row)
        print(f"{name:<16}{row['tok_s']:>10,.0f}{flops / 1e6:>12.2f}{row['memory_bytes'] / 2**20:>10.1f}"
              f"{row['speed']:>8.2f}x{row['flop_ceiling']:>10.2f}x{row['speed'] / row['flop_ceiling']:>8.0%}"
              f"{row['memory_ratio']:>7.2f}x{row['spread']:>8.0%}")
    warn_if_noisy({row["variant"]: row["spread"] for row in rows})
    write_csv(cfg.csv, rows)
    if cfg.profile:
        print_profiles({name: training_step(model, cfg, device, autocast)[0] for name, model in models.items()},
                       per=("step", 1))


DECODE_CAPACITIES = (0.125, 0.25, 0.5, 1.0)


def route_share(model, capacity, seed):
    """Set each routed block's router bias so that causal routing sends about `capacity` of the
    tokens through: an untrained router routes about half of them whatever its capacity is."""

    def calibrate(block, args):
        scores = block.router(args[0]).flatten()
        threshold = torch.quantile(scores, 1 - capacity) if capacity < 1 else scores.min() - 1
        block.router.bias -= threshold  # the bias never changes top-k; here it moves the causal cut

    hooks = [block.register_forward_pre_hook(calibrate) for block in model.routed_blocks().values()]
    tokens = torch.randint(model.config.vocab_size, (4, model.config.block_size),
                           generator=torch.Generator().manual_seed(seed))
    with torch.no_grad(), model.routing("causal"):  # block by block: each sees the routing before it
        model(tokens.to(next(model.parameters()).device))
    for hook in hooks:
        hook.remove()
    return model


def hf_generate(config, device):
    """(transformers' GPT2LMHeadModel.generate at the same dims, None), or (None, why not)."""
    classes, why_not = import_optional("transformers", "GPT2Config", "GPT2LMHeadModel")
    if classes is None:
        return None, why_not
    GPT2Config, GPT2LMHeadModel = classes
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size,
                                    n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    bos_token_id=None, eos_token_id=None)).to(device).eval()  # never stops early

    def generate(prompt, n, use_cache):
        return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, use_cache=use_cache, pad_token_id=0)

    return generate, None


@torch.no_grad()
def bench_decode(cfg, settings, config, device):
    """Greedy generation, cached and uncached, one row per model; MoD at four capacities."""
    models = {}
    for name, vs in settings.items():
        if name != "mod":
            models[name] = build(name, vs, config, cfg.seed)
            continue
        for c in DECODE_CAPACITIES:
            model = build(name, dataclasses.replace(vs, capacity=c), config, cfg.seed)
            models[f"mod C={c}"] = route_share(model.to(device), c, cfg.seed)
    generators, kv = {}, {}
    for name, model in models.items():
        model.to(device).eval()
        cache = model.new_cache()
        model.generate(torch.zeros((cfg.decode_batch, 1), dtype=torch.long, device=device), cfg.max_new_tokens,
                       temperature=0, cache=cache)
        kv[name] = model.kv_cache_nbytes(cache)
        generators[name] = lambda prompt, n, use_cache, model=model: model.generate(prompt, n, temperature=0,
                                                                                    use_cache=use_cache)
    hf, hf_missing = hf_generate(config, device)
    if hf is not None:
        generators["transformers GPT-2"] = hf
    prompt = torch.zeros((cfg.decode_batch, 1), dtype=torch.long, device=device)
    runs = {}
    for name, generate in generators.items():
        generate(prompt, 4, True)  # warmup
        for use_cache in (True, False):
            runs[name, use_cache] = lambda generate=generate, use_cache=use_cache: median_seconds(
                lambda: generate(prompt, cfg.max_new_tokens, use_cache), 1, device)
    seconds = {key: median_and_spread(r) for key, r in interleaved(runs, cfg).items()}
    tokens = cfg.decode_batch * cfg.max_new_tokens
    print(f"# greedy decode of {cfg.max_new_tokens} tokens, batch {cfg.decode_batch}, median of {cfg.repeats} "
          f"interleaved rounds; MoD routers set to route C of the tokens")
    print(f"{'variant':<20}{'cached tok/s':>13}{'uncached tok/s':>15}{'speedup':>9}{'vs baseline':>12}"
          f"{'KV bytes':>12}{'KV vs base':>11}{'spread':>8}")
    rows = []
    for name in generators:
        (cached, spread_c), (uncached, spread_u) = seconds[name, True], seconds[name, False]
        row = dict(variant=name, cached_tok_s=tokens / cached, uncached_tok_s=tokens / uncached,
                   kv_bytes=kv.get(name, ""), spread=max(spread_c, spread_u))
        base = rows[0] if rows else row
        row["cached_vs_baseline"] = row["cached_tok_s"] / base["cached_tok_s"]
        rows.append(row)
        kv_text = (f"{row['kv_bytes']:>12,}{row['kv_bytes'] / base['kv_bytes']:>10.2f}x" if name in kv
                   else f"{'-':>12}{'-':>11}")
        print(f"{name:<20}{row['cached_tok_s']:>13,.0f}{row['uncached_tok_s']:>15,.0f}"
              f"{row['cached_tok_s'] / row['uncached_tok_s']:>8.2f}x{row['cached_vs_baseline']:>11.2f}x"
              f"{kv_text}{row['spread']:>8.0%}")
    if hf is None:
        print(f"# no row for transformers' GPT-2 generate: {hf_missing}")
    warn_if_noisy({row["variant"]: row["spread"] for row in rows})
    write_csv(cfg.csv, rows)
    if cfg.profile:
        print_profiles({name: lambda g=g: g(prompt, cfg.max_new_tokens, True) for name, g in generators.items()},
                       per=("token", cfg.max_new_tokens))

if __name__ == "__main__":
    main(sys.argv[1:])
