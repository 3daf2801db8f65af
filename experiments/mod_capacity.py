"""
Capacity and routing frequency, the Mixture-of-Depths paper's hyper-parameter sweep: at one
training-FLOP budget and one model size, MoD with capacity C in {0.125, 0.25, 0.5, 1.0}, routing
every block or every other block, each trained for budget / (FLOPs per token x tokens per step)
steps (a smaller C is cheaper per token, so it takes more steps), with the baseline of the same
size and budget as reference. Plot: val loss (causal mode solid, top-k dotted) against C.

    python experiments/mod_capacity.py                 # --preset cpu
    python experiments/mod_capacity.py --preset smoke  # seconds, for the tests
"""

import kit

NAME = "mod_capacity"
PRESETS = {
    "smoke": {"dataset": "shakespeare_char", "budget": 2e8, "capacities": [0.25, 1.0],
              "route_every": [1, 2],
              "train": dict(n_layer=2, n_head=2, n_embd=16, block_size=16, batch_size=4,
                            eval_iters=1, log_interval=1000, device="cpu")},
    "cpu": {"dataset": "shakespeare_char", "budget": 5e11, "capacities": [0.125, 0.25, 0.5, 1.0],
            "route_every": [1, 2],
            "train": dict(n_layer=4, n_head=3, n_embd=96, block_size=64, batch_size=12,
                          eval_iters=10, log_interval=1000, device="cpu", compile=False)},
    "gpu": {"dataset": "openwebtext", "budget": 6e18, "capacities": [0.125, 0.25, 0.5, 1.0],
            "route_every": [1, 2],
            "train": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=12,
                          gradient_accumulation_steps=40, eval_iters=100, log_interval=100,
                          learning_rate=6e-4, min_lr=6e-5, warmup_iters=700, dtype="bfloat16")},
}


def plan(preset, dataset):
    base = kit.common_flags(preset, dataset)
    variants = [("baseline", {"variant": "baseline"})]
    for every in preset["route_every"]:
        for c in preset["capacities"]:
            variants.append((f"mod-C{c}-every{every}",
                             {"variant": "mod", "capacity": c, "route_every": every}))
    runs = []
    for name, extra in variants:
        flags = {**base, **extra}
        _, fpt = kit.model_stats(flags)
        runs.append((name, kit.schedule(flags, kit.steps_for_budget(preset["budget"], fpt, flags))))
    return runs


def draw(rows, path):
    plt = kit.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for every, color in zip(sorted({r["route_every"] for r in rows if r["variant"] == "mod"}),
                            ("C0", "C1", "C2")):
        mine = sorted((r for r in rows if r.get("route_every") == every),
                      key=lambda r: r["capacity"])
        which = ("every block" if every == 1 else f"every {every}nd block" if every == 2
                 else f"every {every}th block")
        ax.plot([r["capacity"] for r in mine], [r["val_loss"] for r in mine], "o-", color=color,
                label=f"MoD causal, {which}")
        ax.plot([r["capacity"] for r in mine], [r["val_loss_topk"] for r in mine], "o:",
                color=color, alpha=0.6, label=f"MoD top-k, {which}")
    for r in rows:
        if r["variant"] == "baseline":
            ax.axhline(r["val_loss"], color="k", linestyle="--", label="baseline, same budget")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("capacity C (share of tokens a routed block processes)")
    ax.set_ylabel("val loss")
    ax.set_title(f"equal training FLOPs ({rows[0]['train_flops']:.1e})")
    ax.legend(fontsize=7)
    kit.save_figure(fig, path)


def main(argv=None):
    args = kit.parse_args(__doc__, PRESETS, argv)
    runs = plan(PRESETS[args.preset], args.dataset)
    if args.preset == "gpu":
        kit.confirm_gpu(runs, args.yes)
    out_dirs = kit.run_all(runs, kit.runs_dir(args, NAME))
    rows = [kit.summarize(name, flags, out_dirs[name]) for name, flags in runs]
    kit.write_csv(rows, f"{args.results_dir}/{NAME}.csv")
    kit.print_table(rows, ["run", "params", "flops_per_token", "steps", "ms_per_step", "val_loss",
                           "val_loss_topk"])
    draw(rows, f"{args.assets_dir}/{NAME}.png")


if __name__ == "__main__":
    main()
