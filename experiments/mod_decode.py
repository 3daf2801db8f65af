"""
Sampling speed, the Mixture-of-Depths paper's "faster to step when sampling": trained MoD models
at capacity C in {0.125, 0.25, 0.5, 1.0} (every other block routed) and a baseline of the same
size, each decoding greedily with a KV cache from a val prompt to the end of its context.
Plot: decode tokens/s and KV-cache bytes against C, baseline as a horizontal line.

    python experiments/mod_decode.py                 # --preset cpu
    python experiments/mod_decode.py --preset smoke  # seconds, for the tests

Decoding uses the models' own generate() (MoD decides causally, token by token), new_cache()
and kv_cache_nbytes(); tokens/s is the best of `repeats` runs, each model in turn.
"""

import os
import time

import numpy as np
import torch

import kit

NAME = "mod_decode"
PRESETS = {
    "smoke": {"dataset": "shakespeare_char", "steps": 4, "capacities": [0.25, 1.0], "prompt": 4,
              "repeats": 1,
              "train": dict(n_layer=2, n_head=2, n_embd=16, block_size=16, batch_size=4,
                            eval_iters=1, log_interval=1000, device="cpu")},
    "cpu": {"dataset": "shakespeare_char", "steps": 400, "capacities": [0.125, 0.25, 0.5, 1.0],
            "prompt": 16, "repeats": 3,
            "train": dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=8,
                          eval_iters=10, log_interval=1000, device="cpu", compile=False)},
    "gpu": {"dataset": "openwebtext", "steps": 5000, "capacities": [0.125, 0.25, 0.5, 1.0],
            "prompt": 16, "repeats": 3,
            "train": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=12,
                          gradient_accumulation_steps=40, eval_iters=100, log_interval=100,
                          learning_rate=6e-4, min_lr=6e-5, warmup_iters=700, dtype="bfloat16")},
}


@torch.no_grad()
def decode(model, prompt, repeats):
    """(tokens/s, KV-cache bytes at the end) of greedy cached decoding to the end of the context."""
    new = model.config.block_size - prompt.size(1)
    model.generate(prompt, 2, temperature=0)  # warmup
    best, nbytes = float("inf"), 0
    for _ in range(repeats):
        cache = model.new_cache()
        t0 = time.perf_counter()
        model.generate(prompt, new, temperature=0, use_cache=True, cache=cache)
        best = min(best, time.perf_counter() - t0)
        nbytes = model.kv_cache_nbytes(cache)
    return new / best, nbytes


def draw(rows, path):
    plt = kit.pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    mod = sorted((r for r in rows if r["variant"] == "mod"), key=lambda r: r["capacity"])
    base = [r for r in rows if r["variant"] == "baseline"][0]
    for ax, key, label in ((left, "decode_tokens_per_s", "greedy decode tokens/s (cached)"),
                           (right, "kv_cache_bytes", "KV-cache bytes at the end of the context")):
        ax.plot([r["capacity"] for r in mod], [r[key] for r in mod], "o-",
                label="MoD, every other block")
        ax.axhline(base[key], color="k", linestyle="--", label="baseline")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("capacity C")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    left.set_title("decode speed (batch 1, CPU)")
    right.set_title("KV cache")
    kit.save_figure(fig, path)


def main(argv=None):
    args = kit.parse_args(__doc__, PRESETS, argv)
    preset = PRESETS[args.preset]
    base = kit.common_flags(preset, args.dataset)
    runs = [("baseline", kit.schedule({**base, "variant": "baseline"}, preset["steps"]))]
    runs += [(f"mod-C{c}", kit.schedule({**base, "variant": "mod", "capacity": c, "route_every": 2},
                                        preset["steps"]))
             for c in preset["capacities"]]
    if args.preset == "gpu":
        kit.confirm_gpu(runs, args.yes)
    out_dirs = kit.run_all(runs, kit.runs_dir(args, NAME))
    import checkpoint
    # as the training runs (kit.py)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 1)))
    rows = []
    for name, flags in runs:
        model, _ = checkpoint.load_model(out_dirs[name])
        model.eval()
        val = np.fromfile(checkpoint.data_dir(flags["dataset"]) / "val.bin", dtype=np.uint16)
        prompt = torch.from_numpy(val[:preset["prompt"]].astype(np.int64)).unsqueeze(0)
        speed, nbytes = decode(model, prompt, preset["repeats"])
        rows.append({**kit.summarize(name, flags, out_dirs[name]),
                     "capacity": flags.get("capacity", 1.0),
                     "decode_tokens": model.config.block_size - preset["prompt"],
                     "decode_tokens_per_s": round(speed, 1), "kv_cache_bytes": nbytes})
    kit.write_csv(rows, f"{args.results_dir}/{NAME}.csv")
    kit.print_table(rows, ["run", "steps", "val_loss", "decode_tokens_per_s", "kv_cache_bytes"])
    draw(rows, f"{args.assets_dir}/{NAME}.png")


if __name__ == "__main__":
    main()
