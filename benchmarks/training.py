"""
Training rows: tokens/s of a full step (forward, backward, the model's own optimizer), training
FLOPs per token (DESIGN.md convention), memory, and ratios to the reference measured in the
same run. The FLOP ceiling is reference FLOPs / variant FLOPs: the speed-up a perfect
implementation would reach. A variant's FLOPs are those of the routing its last timed step
took (step_flops_per_token). Memory is peak CUDA memory on a GPU, and the bytes autograd saved
for the backward pass (activations) on CPU, where no allocator peak is exposed.
"""

import dataclasses

import torch

from benchmarks.profiling import print_profiles
from benchmarks.timing import (interleaved, median_and_spread, median_seconds, warn_if_noisy,
                               write_csv)
from model import GPT
from variants import VARIANTS


def build(name, settings, config, seed):
    """A freshly initialised model of one variant (from a dense one where it needs that)."""
    torch.manual_seed(seed)
    cls = VARIANTS[name][0]
    if cls.starts_from_dense:
        return cls.from_dense(GPT(config), settings)
    return cls(config, settings)


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
        model(x, y)
    return total


def training_step(model, cfg, device, autocast):
    """A function running one full training step (forward, backward, the optimizer the model
    configures for itself, with train.py's default settings) on fixed random tokens."""
    optimizer = model.configure_optimizers(0.1, 1e-4, (0.9, 0.99), device.split(":")[0])
    step_model = torch.compile(model) if cfg.compile else model
    g = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch_size, cfg.block_size)
    x = torch.randint(model.config.vocab_size, shape, generator=g).to(device)
    y = torch.randint(model.config.vocab_size, shape, generator=g).to(device)

    def step():
        with autocast:
            _, loss, aux = step_model(x, y)
            loss = model.training_loss(loss, aux)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, x, y


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


def bench_training(cfg, settings, config, device, autocast):
    """One row per variant: tokens/s of a training step, FLOPs, memory, ratios to the first."""
    models = {name: build(name, vs, config, cfg.seed).to(device) for name, vs in settings.items()}
    memory, steps = {}, {}
    for name, model in models.items():
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        _, memory[name] = time_training(model, dataclasses.replace(cfg, steps=1), device, autocast)
        step = training_step(model, cfg, device, autocast)[0]
        steps[name] = lambda step=step: median_seconds(step, cfg.steps, device)
    rounds = interleaved(steps, cfg.repeats)
    seconds = {name: median_and_spread(r) for name, r in rounds.items()}
    print(f"# training step, batch {cfg.batch_size} x {cfg.block_size} tokens, median of "
          f"{cfg.repeats} interleaved rounds of {cfg.steps} steps")
    rows = training_rows(cfg, models, seconds, memory)
    print_training_rows(rows, "peak MiB" if device.startswith("cuda") else "act. MiB")
    warn_if_noisy({row["variant"]: row["spread"] for row in rows})
    write_csv(cfg.csv, rows)
    if cfg.profile:
        print_profiles({name: training_step(model, cfg, device, autocast)[0]
                        for name, model in models.items()}, per=("step", 1))


def training_rows(cfg, models, seconds, memory):
    """The CSV rows: measurements and their ratios to the first model's."""
    rows, base = [], None
    for name, model in models.items():
        flops = model.step_flops_per_token(cfg.block_size)
        row = dict(variant=name, tok_s=cfg.batch_size * cfg.block_size / seconds[name][0],
                   flops_per_token=flops, memory_bytes=memory[name], spread=seconds[name][1])
        base = base or row
        row.update(speed=row["tok_s"] / base["tok_s"], flop_ceiling=base["flops_per_token"] / flops,
                   memory_ratio=row["memory_bytes"] / base["memory_bytes"])
        rows.append(row)
    return rows


def print_training_rows(rows, mem_name):
    print(f"{'variant':<16}{'tok/s':>10}{'MFLOPs/tok':>12}{mem_name:>10}{'speed x':>9}"
          f"{'FLOP ceil':>11}{'of ceil':>9}{'mem x':>8}{'spread':>8}")
    for row in rows:
        print(f"{row['variant']:<16}{row['tok_s']:>10,.0f}{row['flops_per_token'] / 1e6:>12.2f}"
              f"{row['memory_bytes'] / 2**20:>10.1f}{row['speed']:>8.2f}x"
              f"{row['flop_ceiling']:>10.2f}x{row['speed'] / row['flop_ceiling']:>8.0%}"
              f"{row['memory_ratio']:>7.2f}x{row['spread']:>8.0%}")
