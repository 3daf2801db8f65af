"""
isoFLOP curves, the Mixture-of-Depths paper's main figure: at a fixed training-FLOP budget,
train the baseline and MoD (capacity 0.125, every other block routed) at several sizes (depth,
heads and width grown together), each for budget / (FLOPs per token x tokens per step) steps on the
same data order (same seed). Left: val loss against non-embedding parameters per variant and
budget, minimum marked (MoD: causal mode solid, top-k dotted). Right: val loss against training
seconds for the best baseline and the best MoD of the largest budget.

    python experiments/mod_isoflop.py                 # --preset cpu
    python experiments/mod_isoflop.py --preset smoke  # seconds, for the tests
"""

import kit

NAME = "mod_isoflop"
MOD = {"variant": "mod", "capacity": 0.125, "route_every": 2}
# (layers, heads, width), depth and width grown together; head size 32 from 64 wide up
CPU_SIZES = [(1, 1, 16), (1, 1, 32), (2, 2, 32), (2, 2, 48), (2, 2, 64), (3, 3, 96)]
PRESETS = {  # budgets: {training FLOPs: the sizes trained at that budget}
    "smoke": {"dataset": "shakespeare_char", "budgets": {2e8: [(2, 2, 16), (2, 2, 32)]},
              "train": dict(block_size=16, batch_size=4, eval_iters=1, log_interval=1000, device="cpu")},
    # tiny char-level models, 1 x 16 to 3 x 96 wide: around each budget's optimum, a size below it
    # and one above, not more (the small ones are the dear ones: many thousand steps whose time is
    # mostly per-op overhead). MoD from 2 layers (with route_every 2 a 1-layer model routes
    # nothing). 27 runs, one thread each (README: time)
    "cpu": {"dataset": "shakespeare_char",
            "budgets": {3e11: CPU_SIZES[:5], 6e11: CPU_SIZES, 1.2e12: CPU_SIZES[1:]},
            "train": dict(block_size=64, batch_size=12, eval_iters=20, log_interval=1000, device="cpu",
                          compile=False)},
    # GPT-2 dims on OpenWebText (1024 tokens, 480 sequences per step)
    "gpu": {"dataset": "openwebtext",
            "budgets": dict.fromkeys([6e18, 2e19], [(6, 6, 384), (8, 8, 512), (12, 12, 768), (16, 16, 1024),
                                                    (24, 16, 1024)]),
            "train": dict(block_size=1024, batch_size=12, gradient_accumulation_steps=40, eval_iters=100,
                          log_interval=100, learning_rate=6e-4, min_lr=6e-5, warmup_iters=700,
                          dtype="bfloat16")},
}


def plan(preset, dataset):
    runs = []
    base = kit.common_flags(preset, dataset)
    for budget, sizes in preset["budgets"].items():
        for n_layer, n_head, n_embd in sizes:
            for variant, extra in (("baseline", {"variant": "baseline"}), ("mod", MOD)):
                if variant == "mod" and n_layer < MOD["route_every"]:
                    continue  # no block would be routed
                flags = {**base, **extra, "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head}
                _, fpt = kit.model_stats(flags)
                flags = kit.schedule(flags, kit.steps_for_budget(budget, fpt, flags))
                runs.append((f"{budget:g}-{variant}-L{n_layer}-d{n_embd}", {**flags, "_budget": budget}))
    return runs


def draw(rows, runs_by_name, path):
    plt = kit.pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    budgets = sorted({r["budget"] for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for j, budget in enumerate(budgets):
        for variant, key, style in (("baseline", "val_loss", "s-"), ("mod", "val_loss", "o-"),
                                    ("mod", "val_loss_topk", "o:")):
            pts = sorted((r["params"], r[key]) for r in rows if r["budget"] == budget and r["variant"] == variant)
            if not pts:
                continue
            label = f"{variant}{' top-k' if key.endswith('topk') else (' causal' if variant == 'mod' else '')}, {budget:g} FLOPs"
            color = colors[(2 * j + (variant == "mod")) % len(colors)]
            left.plot(*zip(*pts), style, color=color, label=label, alpha=0.6 if ":" in style else 1.0)
            best = min(pts, key=lambda p: p[1])
            left.plot(*best, "*", color=color, markersize=14)
    left.set_xscale("log")
    left.set_xlabel("non-embedding parameters")
    left.set_ylabel("val loss")
    left.set_title("isoFLOP curves (star: minimum)")
    left.legend(fontsize=7)
    largest = [r for r in rows if r["budget"] == budgets[-1]]
    for variant in ("baseline", "mod"):
        mine = [r for r in largest if r["variant"] == variant]
        if not mine:
            continue
        best = min(mine, key=lambda r: r["val_loss"])
        log = kit.read_log(runs_by_name[best["run"]])
        right.plot([e["train_seconds"] for e in log], [e["val"]["loss"] for e in log], "o-",
                   label=f"best {variant}: L{best['n_layer']} d{best['n_embd']}")
    right.set_xlabel("training seconds (evaluation excluded)")
    right.set_ylabel("val loss (MoD: causal)")
    right.set_title(f"wall clock, budget {budgets[-1]:g} FLOPs")
    right.legend(fontsize=8)
    kit.save_figure(fig, path)


def main(argv=None):
    args = kit.parse_args(__doc__, PRESETS, argv)
    preset = PRESETS[args.preset]
    runs = plan(preset, args.dataset)
    train_runs = [(name, {k: v for k, v in f.items() if not k.startswith("_")}) for name, f in runs]
    if args.preset == "gpu":
        kit.confirm_gpu(train_runs, args.yes)
    out_dirs = kit.run_all(train_runs, kit.runs_dir(args, NAME))
    rows = [{"budget": f["_budget"], **kit.summarize(name, flags, out_dirs[name])}
            for (name, f), (_, flags) in zip(runs, train_runs)]
    kit.write_csv(rows, f"{args.results_dir}/{NAME}.csv")
    kit.print_table(rows, ["budget", "variant", "n_layer", "n_embd", "params", "steps", "ms_per_step",
                           "val_loss", "val_loss_topk"])
    draw(rows, out_dirs, f"{args.assets_dir}/{NAME}.png")


if __name__ == "__main__":
    main()
