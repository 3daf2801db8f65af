"""
What router-tuning costs: one epoch over 0.25, 1 and 4 times the default 1,000 tuning windows
(attention gates per sequence, target 0.5, three seeds), on the dense model of rt_frontier.py
(shared with it). Plot: val loss and realised capacity against tuning seconds, each point
labelled with its number of windows.

    python experiments/rt_cost.py                 # --preset cpu
                                                  # (trains rt_frontier's dense model if needed)
    python experiments/rt_cost.py --preset smoke  # seconds, for the tests
"""

from types import SimpleNamespace

import kit
import rt_frontier
from mindskip import MindSkipGPT

NAME = "rt_cost"
SAMPLES = {"smoke": [8, 32], "cpu": [250, 1000, 4000], "gpu": [250, 1000, 4000]}


def draw(rows, path):
    plt = kit.pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for r in rows[1:]:
        for ax, key in ((left, "val_loss"), (right, "val_capacity")):
            ax.scatter(r["train_seconds"], r[key], color="C0")
            ax.annotate(str(r["train_samples"]), (r["train_seconds"], r[key]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    left.axhline(rows[0]["val_loss"], color="k", linestyle="--", label="dense model")
    right.axhline(0.5, color="k", linestyle=":", label="target")
    left.set_ylabel("val loss")
    right.set_ylabel("realised capacity")
    for ax in (left, right):
        ax.set_xlabel("tuning seconds (one epoch; label: tuning windows)")
        ax.legend(fontsize=7)
    left.set_title("router-tuning cost: attention gates, target 0.5")
    kit.save_figure(fig, path)


def main(argv=None):
    args = kit.parse_args(__doc__, rt_frontier.PRESETS, argv)
    preset = rt_frontier.PRESETS[args.preset]
    base = kit.common_flags(preset, args.dataset)
    shared = kit.runs_dir(args, rt_frontier.NAME) if not args.runs_dir else kit.runs_dir(args, NAME)
    if not preset["dense_steps"]:
        raise SystemExit("the gpu preset tunes GPT-2 itself: "
                         "run config/router_tuning_gpt2.py with --train_samples")
    dense = [("dense", kit.schedule({**base, "variant": "baseline"}, preset["dense_steps"]))]
    init_from = str(kit.run_all(dense, shared)["dense"])
    tune = {k: v for k, v in base.items() if k not in rt_frontier.MODEL_FLAGS}
    runs = []
    for samples in SAMPLES[args.preset]:
        for seed in preset["seeds"]:
            flags = {**tune, "variant": "router_tuning", "init_from": init_from, "skip": "attn",
                     "target_capacity": 0.5, "train_samples": samples, "seed": seed}
            # train.py's default recipe for router-tuning: one epoch, 3% warmup, cosine to 0
            recipe = MindSkipGPT.train_defaults(SimpleNamespace(
                train_samples=samples, batch_size=tune["batch_size"],
                gradient_accumulation_steps=1))
            flags = {**flags, **preset["tune"], **recipe, "eval_interval": recipe["max_iters"]}
            runs.append((f"samples{samples}-s{seed}", flags))
    out_dirs = kit.run_all(runs, kit.runs_dir(args, NAME))
    rows = [kit.summarize("dense", dense[0][1], shared / "dense")]
    for name, flags in runs:  # the share of open gates on training text too (train.py's estimate)
        row = kit.summarize(name, flags, out_dirs[name])
        train_capacity = kit.read_log(out_dirs[name])[-1]["train"]["capacity"]
        rows.append({**row, "train_capacity": train_capacity})
    kit.write_csv(rows, f"{args.results_dir}/{NAME}.csv")
    columns = ["run", "steps", "train_seconds", "val_loss", "train_capacity", "val_capacity"]
    kit.print_table(rows, columns)
    draw(rows, f"{args.assets_dir}/{NAME}.png")


if __name__ == "__main__":
    main()
