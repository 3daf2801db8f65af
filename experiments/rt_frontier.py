"""
Router-Tuning's trade-off frontier: one dense model trained first, then routers tuned on it
(backbone frozen) with the gate on attention, MLP or the whole block, at target capacities
0.25, 0.5, 0.75, three seeds, one gate per sequence and one per token. Plot: val loss against
realised capacity (the share of gated sublayers left open), the dense model as reference.

    python experiments/rt_frontier.py                 # --preset cpu
    python experiments/rt_frontier.py --preset smoke  # seconds, for the tests
"""

import kit

NAME = "rt_frontier"
PRESETS = {
    "smoke": {"dataset": "shakespeare_char", "dense_steps": 8, "tune_steps": 4, "skips": ["attn", "block"],
              "targets": [0.5], "seeds": [1337], "levels": ["sequence"],
              "train": dict(n_layer=4, n_head=2, n_embd=16, block_size=16, batch_size=4, eval_iters=1,
                            log_interval=1000, device="cpu")},
    "cpu": {"dataset": "shakespeare_char", "dense_steps": 1000, "tune_steps": 100, "skips": ["attn", "mlp", "block"],
            "targets": [0.25, 0.5, 0.75], "seeds": [1337, 1, 2], "levels": ["sequence", "token"],
            "train": dict(n_layer=6, n_head=4, n_embd=128, block_size=64, batch_size=12, eval_iters=10,
                          log_interval=1000, device="cpu", compile=False)},
    "gpu": {"dataset": "openwebtext", "dense_steps": 0, "tune_steps": 100, "skips": ["attn", "mlp", "block"],
            "targets": [0.25, 0.5, 0.75], "seeds": [1337, 1, 2], "levels": ["sequence", "token"],
            "train": dict(block_size=1024, batch_size=8, eval_iters=100, log_interval=10, dtype="bfloat16")},
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
                    flags = {**tune_base, "variant": "router_tuning", "init_from": init_from, "skip": skip,
                             "router_level": level, "target_capacity": target, "seed": seed}
                    runs.append((f"{level}-{skip}-t{target}-s{seed}", kit.schedule(flags, preset["tune_steps"])))
    if args.preset == "gpu":
        kit.confirm_gpu(runs, args.yes)
    out_dirs = kit.run_all(runs, runs_dir)
    rows = [kit.summarize(name, flags, runs_dir / name) for name, flags in dense]
    rows += [kit.summarize(name, flags, out_dirs[name]) for name, flags in runs]
    kit.write_csv(rows, f"{args.results_dir}/{NAME}.csv")
    kit.print_table(rows, ["run", "steps", "val_loss", "val_capacity"])
    draw(rows, f"{args.assets_dir}/{NAME}.png")


def draw(rows, path):
    plt = kit.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for skip, color in zip(("attn", "mlp", "block"), ("C0", "C1", "C2")):
        for level, marker in (("sequence", "o"), ("token", "x")):
            mine = [r for r in rows if r.get("skip") == skip and r.get("router_level") == level]
            if mine:
                ax.scatter([r["val_capacity"] for r in mine], [r["val_loss"] for r in mine], color=color,
                           marker=marker, label=f"{skip} gates, per {level}")
    for r in rows:
        if r["variant"] == "baseline":
            ax.axhline(r["val_loss"], color="k", linestyle="--", label="dense model")
    ax.set_xlabel("realised capacity (share of gated sublayers open)")
    ax.set_ylabel("val loss")
    ax.set_title("router-tuning: targets 0.25 / 0.5 / 0.75")
    ax.legend(fontsize=7)
    kit.save_figure(fig, path)


if __name__ == "__main__":
    main()
