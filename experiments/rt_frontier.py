"""
Router-Tuning's trade-off frontier: one dense model trained first, then routers tuned on it
(backbone frozen) with the gate on attention, MLP or the whole block, at target capacities
0.25, 0.5, 0.75, three seeds, one gate per sequence and one per token. Plot: val loss against
realised capacity (the share of gated sublayers left open), the dense model as reference, and
val loss against measured forward time (relative to the dense model, one thread, 32 val windows).

Against it, static dropping (does routing beat just removing sublayers?): the same candidate
layers, ranked once by how little each changes its input on the tuning data (cosine
similarity between a sublayer's input and output, high = redundant, the score of the same
authors' work on dropping attention layers), and the most redundant ones closed for every
input (`--gate_threshold=2` closes the listed gates; no training, one evaluation).

    python experiments/rt_frontier.py                 # --preset cpu
    python experiments/rt_frontier.py --preset smoke  # seconds, for the tests
"""

import time

import kit

import numpy as np
import torch
import torch.nn.functional as F

NAME = "rt_frontier"
PRESETS = {
    "smoke": {"dataset": "shakespeare_char", "dense_steps": 8, "tune_steps": 4,
              "skips": ["attn", "block"],
              "targets": [0.5], "seeds": [1337], "levels": ["sequence"], "tune": dict(min_lr=0.0),
              "train": dict(n_layer=4, n_head=2, n_embd=16, block_size=16, batch_size=4,
                            eval_iters=1, log_interval=1000, device="cpu")},
    "cpu": {"dataset": "shakespeare_char", "dense_steps": 1000, "tune_steps": 100,
            "skips": ["attn", "mlp", "block"],
            "targets": [0.25, 0.5, 0.75], "seeds": [1337, 1, 2], "levels": ["sequence", "token"],
            # capacity over 2,400 val windows, at the end
            "tune": dict(min_lr=0.0, eval_iters=200, eval_interval=100),
            "train": dict(n_layer=6, n_head=4, n_embd=128, block_size=64, batch_size=12,
                          eval_iters=10, log_interval=1000, device="cpu", compile=False)},
    "gpu": {"dataset": "openwebtext", "dense_steps": 0, "tune_steps": 100,
            "skips": ["attn", "mlp", "block"],
            "targets": [0.25, 0.5, 0.75], "seeds": [1337, 1, 2], "levels": ["sequence", "token"],
            "tune": dict(min_lr=0.0),
            "train": dict(block_size=1024, batch_size=8, eval_iters=100, log_interval=10,
                          dtype="bfloat16")},
}
MODEL_FLAGS = ("n_layer", "n_head", "n_embd")  # fixed by the dense model once it is trained


def main(argv=None):
    args = kit.parse_args(__doc__, PRESETS, argv)
    preset = PRESETS[args.preset]
    base = kit.common_flags(preset, args.dataset)
    runs_dir = kit.runs_dir(args, NAME)
    if preset["dense_steps"]:
        dense = [("dense", kit.schedule({**base, "variant": "baseline"}, preset["dense_steps"]))]
        init_from = str(kit.run_all(dense, runs_dir)["dense"])
    else:  # the gpu preset tunes the released GPT-2 124M weights
        dense, init_from = [], "gpt2"
    tune_base = {k: v for k, v in base.items() if k not in MODEL_FLAGS}
    runs = []
    for level in preset["levels"]:
        for skip in preset["skips"]:
            for target in preset["targets"]:
                for seed in preset["seeds"]:
                    flags = {**tune_base, "variant": "router_tuning", "init_from": init_from,
                             "skip": skip, "router_level": level, "target_capacity": target,
                             "seed": seed}
                    flags = {**kit.schedule(flags, preset["tune_steps"]), **preset["tune"]}
                    runs.append((f"{level}-{skip}-t{target}-s{seed}", flags))
    static = static_runs(init_from, tune_base, preset) if dense else []
    if args.preset == "gpu":
        kit.confirm_gpu(runs, args.yes)
    out_dirs = kit.run_all(runs + [(name, flags) for name, flags, _ in static], runs_dir)
    rows = [kit.summarize(name, flags, runs_dir / name) for name, flags in dense]
    rows += [kit.summarize(name, flags, out_dirs[name]) for name, flags in runs]
    rows += [{**kit.summarize(name, flags, out_dirs[name]), "static_capacity": cap,
              "val_capacity": cap}
             for name, flags, cap in static]
    if dense:
        add_forward_times(rows, runs_dir, init_from, tune_base)
    kit.write_csv(rows, f"{args.results_dir}/{NAME}.csv")
    kit.print_table(rows, ["run", "steps", "val_loss", "val_capacity", "forward_time_vs_dense"])
    draw(rows, f"{args.assets_dir}/{NAME}.png")


@torch.no_grad()
def forward_seconds(model, idx, repeats=5):
    """Median seconds of one inference forward over idx (closed gates compute nothing)."""
    model.eval()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(idx, idx)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def add_forward_times(rows, runs_dir, init_from, tune_base):
    """forward_time_vs_dense on every row: each tuned checkpoint, and each static dropping
    rebuilt from the dense model with its gates closed, against the dense model itself."""
    import checkpoint
    from mindskip import MindSkipConfig, MindSkipGPT
    torch.set_num_threads(1)  # as the training runs
    dense, _ = checkpoint.load_model(init_from)
    T = dense.config.block_size
    val = np.fromfile(checkpoint.data_dir(tune_base["dataset"]) / "val.bin", dtype=np.uint16)
    windows = min(32, len(val) // T)
    idx = torch.from_numpy(val[: windows * T].astype(np.int64)).view(windows, T)
    reference = forward_seconds(dense, idx)
    for row in rows:
        if row["variant"] == "baseline":
            row["forward_time_vs_dense"] = 1.0
            continue
        if row["run"].startswith("static"):
            model = MindSkipGPT.from_dense(
                dense, MindSkipConfig(skip=row["skip"], skip_layers=row["skip_layers"],
                                      gate_threshold=2.0))
        else:
            model, _ = checkpoint.load_model(runs_dir / row["run"])
        row["forward_time_vs_dense"] = round(forward_seconds(model, idx) / reference, 4)


@torch.no_grad()
def redundancy(model, idx, skip):
    """{layer: mean cosine similarity between the input and output of its `skip` sublayer}."""
    pos = torch.arange(idx.size(1))
    x = model.transformer.wte(idx) + model.transformer.wpe(pos)
    scores = {}
    for i, block in enumerate(model.transformer.h):
        mid = x + block.attn_update(x)
        out = mid + block.mlp_update(mid)
        before, after = {"attn": (x, mid), "mlp": (mid, out), "block": (x, out)}[skip]
        scores[i] = F.cosine_similarity(before, after, dim=-1).mean().item()
        x = out
    return scores


def static_runs(init_from, tune_base, preset):
    """(name, flags, capacity) per skip kind and number of dropped layers: the most redundant
    of the default gated layers closed for every input, on the dense model."""
    import checkpoint
    from mindskip import MindSkipConfig
    dense, _ = checkpoint.load_model(init_from)
    dense.eval()
    T = dense.config.block_size
    tokens = np.fromfile(checkpoint.data_dir(tune_base["dataset"]) / "train.bin", dtype=np.uint16)
    # the start of the tuning slice
    idx = torch.from_numpy(tokens[: 64 * T].astype(np.int64)).view(64, T)
    candidates = MindSkipConfig().gated_layers(dense.config.n_layer)
    runs = []
    for skip in preset["skips"]:
        scores = redundancy(dense, idx, skip)
        ranked = sorted(candidates, key=lambda i: -scores[i])  # most redundant first
        for dropped in range(1, len(candidates) + 1):
            layers = ",".join(str(i) for i in sorted(ranked[:dropped]))
            flags = {**tune_base, "variant": "router_tuning", "init_from": init_from, "skip": skip,
                     "skip_layers": layers, "gate_threshold": 2.0}
            runs.append((f"static-{skip}-drop{dropped}", kit.schedule(flags, 0),
                         1 - dropped / len(candidates)))
    return runs


def draw(rows, path):
    plt = kit.pyplot()
    if plt is None:
        return
    timed = all("forward_time_vs_dense" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if timed else 1, figsize=(12 if timed else 6.5, 4.5),
                             squeeze=False)
    for ax, x_key in zip(axes[0], ("val_capacity", "forward_time_vs_dense")):
        for skip, color in zip(("attn", "mlp", "block"), ("C0", "C1", "C2")):
            for level, marker in (("sequence", "o"), ("token", "x")):
                mine = [r for r in rows if r.get("skip") == skip and r.get("router_level") == level
                        and not r["run"].startswith("static")]
                if mine:
                    ax.scatter([r[x_key] for r in mine], [r["val_loss"] for r in mine], color=color,
                               marker=marker, label=f"{skip} gates, per {level}")
            static = sorted((r[x_key], r["val_loss"]) for r in rows
                            if r.get("skip") == skip and r["run"].startswith("static"))
            if static:
                ax.plot(*zip(*static), "s--", color=color, alpha=0.7,
                        label=f"{skip} dropped statically")
        for r in rows:
            if r["variant"] == "baseline":
                ax.axhline(r["val_loss"], color="k", linestyle="--", label="dense model")
        ax.set_ylabel("val loss")
        ax.legend(fontsize=7)
    axes[0][0].set_xlabel("realised capacity (share of gated sublayers open)")
    axes[0][0].set_title("router-tuning: targets 0.25 / 0.5 / 0.75")
    if timed:
        axes[0][1].set_xlabel("forward time / the dense model's (one thread, 32 val windows)")
        axes[0][1].set_title("the same runs against measured time")
    kit.save_figure(fig, path)


if __name__ == "__main__":
    main()
