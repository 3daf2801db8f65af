"""
--checkpoints: trained models side by side (the first is the reference for the ratios).
--decode=True generates from a prompt taken from their val set; --prefill=True runs their
whole val set through each model once (val loss, each model's own metrics, forward time).
"""

import dataclasses
import time

import numpy as np
import torch

from benchmarks.decode import time_decode
from benchmarks.profiling import print_profiles
from benchmarks.timing import interleaved, median_and_spread, sync, warn_if_noisy
from checkpoint import data_dir, load_model
from configurator import fail


def val_tokens(ckpt):
    """The val split of the dataset a checkpoint was trained on, as int64 tokens."""
    folder = data_dir(ckpt["config"]["dataset"])
    if not (folder / "val.bin").exists():
        fail(f"{folder}/val.bin is missing: prepare the dataset the checkpoint was trained on")
    return torch.from_numpy(np.fromfile(folder / "val.bin", dtype=np.uint16).astype(np.int64))


@torch.no_grad()
def measure_checkpoints(cfg, device, autocast):
    """Trained models side by side: the decode table, or (--prefill) every val window once."""
    loaded = [(path, *load_model(path)) for path in cfg.checkpoints.split(",")]
    for _, model, _ in loaded:
        model.to(device).eval()
    if cfg.decode:
        return decode_checkpoints(cfg, device, loaded)
    return prefill_checkpoints(cfg, device, autocast, loaded)


def decode_checkpoints(cfg, device, loaded):
    """Greedy decode after a val prompt, inside one context window: past its context the cache
    restarts at every token (exact, but no faster)."""
    context = min(model.config.block_size for _, model, _ in loaded)
    if cfg.prompt_len >= context:
        fail(f"--prompt_len {cfg.prompt_len} leaves no room in a {context}-token context")
    cfg = dataclasses.replace(cfg, max_new_tokens=min(cfg.max_new_tokens, context - cfg.prompt_len))
    print(f"# greedy decode of {cfg.max_new_tokens} tokens after a {cfg.prompt_len}-token val "
          f"prompt (one {context}-token context), batch {cfg.decode_batch}")
    print(f"{'checkpoint':<24}{'variant':<15}{'cached tok/s':>13}{'uncached tok/s':>15}"
          f"{'speedup':>9}{'KV bytes':>11}{'KV vs first':>12}")
    first_kv = None
    for path, model, ckpt in loaded:
        prompt = val_tokens(ckpt)[:cfg.prompt_len].expand(cfg.decode_batch, -1)
        cached, kv = time_decode(model, cfg, device, True, prompt)
        uncached, _ = time_decode(model, cfg, device, False, prompt)
        first_kv = first_kv or kv
        print(f"{path:<23} {ckpt['variant']:<15}{cached:>13,.0f}{uncached:>15,.0f}"
              f"{cached / uncached:>8.2f}x{kv:>11,}{kv / first_kv:>11.2f}x")


def val_batches(models, ckpt, device):
    """(number of windows, [(x, y)] batches of 32) covering the val set in whole windows."""
    T = min(m.config.block_size for m in models)
    val = val_tokens(ckpt)
    n = (len(val) - 1) // T
    x, y = val[:n * T].view(n, T), val[1:n * T + 1].view(n, T)
    return n, [(x[i:i + 32].to(device), y[i:i + 32].to(device)) for i in range(0, n, 32)]


def val_metrics(model, batches, n, autocast):
    """Every metric of model.evaluate, averaged over windows."""
    with autocast:
        per_batch = [model.evaluate(xb, yb) for xb, yb in batches]
    return {k: sum(m[k] * len(xb) for m, (xb, _) in zip(per_batch, batches)) / n
            for k in per_batch[0]}


def prefill_checkpoints(cfg, device, autocast, loaded):
    """Val loss and the forward time over every whole val window, ratios to the first."""
    models = [model for _, model, _ in loaded]
    n, batches = val_batches(models, loaded[0][2], device)
    metrics = [val_metrics(model, batches, n, autocast) for model in models]

    def prefill(model):  # the forward pass without targets, over every val window
        sync(device)
        t0 = time.perf_counter()
        with autocast:
            for xb, _ in batches:
                model(xb)
        sync(device)
        return time.perf_counter() - t0

    runs = {i: lambda model=model: prefill(model) for i, model in enumerate(models)}
    seconds = [median_and_spread(r) for r in interleaved(runs, cfg.repeats).values()]
    T = batches[0][0].size(1)
    print(f"# prefill of {n} val windows x {T} tokens, batch 32, median of {cfg.repeats}")
    print(f"{'checkpoint':<24}{'variant':<15}{'val loss':>9}{'prefill s':>11}{'time x':>8}"
          f"{'spread':>8}  other metrics")
    for (path, _, ckpt), m, (t, spread) in zip(loaded, metrics, seconds):
        other = " ".join(f"{k} {v:.4f}" for k, v in m.items() if k != "loss")
        print(f"{path:<23} {ckpt['variant']:<15}{m['loss']:>9.4f}{t:>11.3f}"
              f"{t / seconds[0][0]:>7.3f}x{spread:>8.0%}  {other}")
    warn_if_noisy({path: spread for (path, _, _), (_, spread) in zip(loaded, seconds)})
    if cfg.profile:
        print_profiles({path: lambda model=model: prefill(model)
                        for (path, _, _), model in zip(loaded, models)},
                       per=("batch of 32 windows", len(batches)))
