"""
--compare_kernels: for every chosen variant with a `kernels` setting (MoD's Triton kernels),
the block those kernels serve (kernel_block: forward and backward) and the whole training step
with the Triton kernels and with the PyTorch reference, eager and compiled, same run, same
shapes. The reference model's step, eager and compiled, turns each step into a speed-up and a
fraction of the FLOP ceiling (reference FLOPs / variant FLOPs, DESIGN.md convention).
"""

import dataclasses
import time

import torch

from benchmarks.timing import sync
from benchmarks.training import build, time_training

IMPLEMENTATIONS = [("triton", "triton", False), ("torch", "torch", False),
                   ("triton compiled", "triton", True), ("torch compiled", "torch", True)]


def time_kernel_block(model, cfg, device, autocast):
    """Median seconds of the kernel block's forward and backward."""
    block, run_block = model.kernel_block()
    run_block = torch.compile(run_block) if cfg.compile else run_block
    g = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.batch_size, cfg.block_size, model.config.n_embd)
    x = torch.randn(shape, generator=g).to(device).requires_grad_()
    grad = torch.randn(shape, generator=g).to(device)
    times = []
    for i in range(cfg.warmup + cfg.steps):
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            out = run_block(x)
        out.backward(grad)
        sync(device)
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def compare_kernels(cfg, settings, config, device, autocast):
    """One table per variant whose settings have a `kernels` field."""
    reference, *others = settings
    with_kernels = [n for n in others if settings[n] and hasattr(settings[n], "kernels")]
    if not with_kernels:
        print("# none of the chosen variants has a --kernels setting: pass e.g. --variants=mod")
        return
    reference_s = {}
    for compiled in (False, True):
        model = build(reference, settings[reference], config, cfg.seed).to(device)
        run_cfg = dataclasses.replace(cfg, compile=compiled)
        reference_s[compiled], _ = time_training(model, run_cfg, device, autocast)
        reference_flops = model.flops_per_token(cfg.block_size)
        del model
    for name in with_kernels:
        compare_one(cfg, name, settings[name], config, device, autocast,
                    reference_s, reference_flops)


def compare_one(cfg, name, variant_settings, config, device, autocast, reference_s, ref_flops):
    on_gpu = device.startswith("cuda")
    print(f"# {name} {variant_settings}, batch {cfg.batch_size} x {cfg.block_size}, median of "
          f"{cfg.steps}{'' if on_gpu else '; no GPU: the triton rows run the reference'}")
    print(f"{'implementation':<18}{'block ms':>10}{'step ms':>10}{'speed x':>9}{'FLOP ceil':>11}"
          f"{'of ceil':>9}")
    for label, kernels, compiled in IMPLEMENTATIONS:
        row_settings = dataclasses.replace(variant_settings, kernels=kernels)
        model = build(name, row_settings, config, cfg.seed).to(device)
        run_cfg = dataclasses.replace(cfg, compile=compiled)
        block_s = time_kernel_block(model, run_cfg, device, autocast)
        step_s, _ = time_training(model, run_cfg, device, autocast)
        speed = reference_s[compiled] / step_s
        ceiling = ref_flops / model.flops_per_token(cfg.block_size)
        print(f"{label:<18}{block_s * 1e3:>10.2f}{step_s * 1e3:>10.2f}{speed:>8.2f}x"
              f"{ceiling:>10.2f}x{speed / ceiling:>8.0%}")
        del model
