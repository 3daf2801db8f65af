"""
isoFLOP curves, the Mixture-of-Depths paper's main figure: at a fixed training-FLOP budget,
train the baseline and MoD (capacity 0.125, every other block routed) at several sizes (depth,
heads and width grown together), each for budget / (FLOPs per token x tokens per step) steps on
the same data order (same seed).

The headline, per budget and per MoD evaluation (causal, top-k): the isoFLOP-optimal baseline
(lowest val loss), the best MoD, and the MoD model that matches the optimal baseline's loss
(the cheapest per step among those at or below it), with its FLOPs per step and its training
step time as ratios to the baseline's: the steps timed side by side in one process,
interleaved rounds (bench.py's), one thread on a CPU, its CPU time (the wall time of an idle
machine, and what a busy one disturbs least), median and spread printed.

Figure, left to right: val loss and train loss against non-embedding parameters (star: each
curve's minimum; MoD causal solid, top-k dotted); val loss against training time for the
optimal baseline and the MoD that matches it, time = steps x the side-by-side step time.

    python experiments/mod_isoflop.py                 # --preset cpu
    python experiments/mod_isoflop.py --preset smoke  # seconds, for the tests
"""

import time

import kit
from configurator import fail

NAME = "mod_isoflop"
MOD = {"variant": "mod", "capacity": 0.125, "route_every": 2}
# (layers, heads, width): depth, heads and width grown together
CPU_SIZES = [(1, 1, 8), (1, 1, 16), (1, 1, 32), (2, 2, 32), (2, 2, 48), (2, 2, 64)]
# two 2-layer sizes below L2-d32 at every budget: MoD (2 layers at least) gets a valley of its own
NARROW_2_LAYER = [(2, 2, 16), (2, 2, 24)]
PRESETS = {  # budgets: {training FLOPs: the sizes trained at that budget}
    # timing: (rounds, steps per round) of the side-by-side step times
    "smoke": {"dataset": "shakespeare_char", "budgets": {2e8: [(2, 2, 16), (2, 2, 32)]},
              "timing": (1, 1),
              "train": dict(block_size=16, batch_size=4, eval_iters=1, log_interval=1000,
                            device="cpu")},
    # tiny char-level models, 1 x 8 to 3 x 96 wide: around each budget's optimum, a size below it
    # and one above, not more (the small ones are the dear ones: many thousand steps whose time is
    # mostly per-op overhead). MoD from 2 layers (with route_every 2 a 1-layer model routes
    # nothing). 46 runs, one thread each (docs/mod.md: time)
    "cpu": {"dataset": "shakespeare_char",
            "budgets": {1.5e11: CPU_SIZES[:5] + NARROW_2_LAYER,
                        3e11: CPU_SIZES[1:] + NARROW_2_LAYER,
                        6e11: CPU_SIZES[1:5] + NARROW_2_LAYER,
                        1.2e12: CPU_SIZES[2:] + [(3, 3, 96)] + NARROW_2_LAYER},
            "timing": (9, 10),
            "train": dict(block_size=64, batch_size=12, eval_iters=20, log_interval=1000,
                          device="cpu", compile=False)},
    # GPT-2 dims on OpenWebText (1024 tokens, 480 sequences per step)
    "gpu": {"dataset": "openwebtext", "timing": (5, 3),
            "budgets": dict.fromkeys([6e18, 2e19], [(6, 6, 384), (8, 8, 512), (12, 12, 768),
                                                    (16, 16, 1024), (24, 16, 1024)]),
            "train": dict(block_size=1024, batch_size=12, gradient_accumulation_steps=40,
                          eval_iters=100, log_interval=100, learning_rate=6e-4, min_lr=6e-5,
                          warmup_iters=700, dtype="bfloat16")},
}


def plan(preset, dataset):
    runs = []
    base = kit.common_flags(preset, dataset)
    for budget, sizes in preset["budgets"].items():  # each budget's baselines first: its valley
        for variant, extra in (("baseline", {"variant": "baseline"}), ("mod", MOD)):
            for n_layer, n_head, n_embd in sizes:
                if variant == "mod" and n_layer < MOD["route_every"]:
                    continue  # no block would be routed
                flags = {**base, **extra, "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head}
                _, fpt = kit.model_stats(flags)
                if budget < fpt * kit.tokens_per_step(flags):
                    fail(f"budget {budget:g} FLOPs is less than one training step of {variant} "
                         f"L{n_layer}-d{n_embd} ({fpt * kit.tokens_per_step(flags):.3g} FLOPs): "
                         f"raise the preset's budget or drop that size")
                flags = kit.schedule(flags, kit.steps_for_budget(budget, fpt, flags))
                name = f"{budget:g}-{variant}-L{n_layer}-d{n_embd}"
                runs.append((name, {**flags, "_budget": budget}))
    return runs


def summarize(name, flags, out_dir, budget):
    """kit's row (val metrics of the last evaluation) with the train losses beside them."""
    row = {"budget": budget, **kit.summarize(name, flags, out_dir)}
    train = kit.read_log(out_dir)[-1]["train"]
    row.update({f"train_{k}": train[k] for k in ("loss", "loss_topk") if k in train})
    return row


def size(row):
    return f"L{row['n_layer']}-d{row['n_embd']}"


def best(rows, variant, key):
    mine = [r for r in rows if r["variant"] == variant and kit.isfinite(r.get(key))]
    return min(mine, key=lambda r: r[key]) if mine else None


def matching_mod(rows, loss):
    """The cheapest MoD per step whose loss (causal, or top-k) is at most `loss`, by evaluation."""
    found = {}
    for key in ("val_loss", "val_loss_topk"):
        good = [r for r in rows if r["variant"] == "mod" and r[key] <= loss]
        found[key] = min(good, key=lambda r: r["flops_per_token"]) if good else None
    return found


def step_seconds(step, steps, device):
    """Seconds per step over `steps` steps: on a CPU the CPU time of this thread, which is the
    wall time on an idle machine and what a busy one disturbs least; on a GPU the wall time."""
    if device != "cpu":
        from benchmarks.timing import median_seconds
        return median_seconds(step, steps, device)
    start = time.thread_time()
    for _ in range(steps):
        step()
    return (time.thread_time() - start) / steps


def time_steps(flags_by_name, rounds, steps):
    """{name: (median ms, spread)} of a training step of each model, timed side by side: bench.py's
    step (forward, backward, train.py's AdamW), rounds interleaved (benchmarks.timing), one
    thread on a CPU."""
    import torch
    import bench
    import train
    from benchmarks.timing import interleaved, median_and_spread
    from benchmarks.training import training_step
    from checkpoint import pick_device
    threads = torch.get_num_threads()
    models = {}
    for name, flags in flags_by_name.items():
        cfg, settings, _ = train.parse_args(kit.flag_list(flags))
        models[name] = train.build_model(cfg, settings)
    flags = next(iter(flags_by_name.values()))
    device = "cpu" if flags.get("device") == "cpu" else pick_device("auto")
    if device == "cpu":
        torch.set_num_threads(1)  # as the runs (kit.run_all)
    cfg = bench.BenchConfig(batch_size=flags["batch_size"], block_size=flags["block_size"],
                            steps=steps, repeats=rounds, vocab_size=models[name].config.vocab_size)
    autocast = torch.autocast(device.split(":")[0], enabled=False)
    runs = {}
    for name, model in models.items():
        step = training_step(model.to(device), cfg, device, autocast)[0]
        step(), step()  # warm up
        runs[name] = lambda step=step: step_seconds(step, steps, device)
    result = {name: median_and_spread(r) for name, r in interleaved(runs, rounds).items()}
    torch.set_num_threads(threads)
    return {name: (1000 * sec, spread) for name, (sec, spread) in result.items()}


def against(prefix, mod, key, base, ms):
    """A MoD row's size and loss; its FLOPs and time per step as ratios to the baseline's."""
    return {prefix: size(mod), f"{prefix}_loss": mod[key],
            f"{prefix}_flops_ratio": mod["flops_per_token"] / base["flops_per_token"],
            f"{prefix}_ms": ms[mod["run"]][0], f"{prefix}_spread": ms[mod["run"]][1],
            f"{prefix}_step_time_ratio": ms[mod["run"]][0] / ms[base["run"]][0]}


def headline(rows, flags_by_name, preset):
    """One row per budget and MoD evaluation: the optimal baseline, the best MoD, and the MoD
    that matches the baseline (absent where none does), all timed side by side per budget."""
    out = []
    for budget in sorted({r["budget"] for r in rows}):
        mine = [r for r in rows if r["budget"] == budget]
        base = best(mine, "baseline", "val_loss")
        keys = {"causal": "val_loss", "top-k": "val_loss_topk"}
        tops = {mode: best(mine, "mod", key) for mode, key in keys.items()}
        matches = {mode: matching_mod(mine, base["val_loss"])[key] for mode, key in keys.items()}
        timed = {r["run"] for r in [base, *tops.values(), *matches.values()] if r}
        ms = time_steps({n: flags_by_name[n] for n in sorted(timed)}, *preset["timing"])
        for mode, key in keys.items():
            row = {"budget": budget, "mod_eval": mode, "baseline": size(base),
                   "baseline_params": base["params"], "baseline_loss": base["val_loss"],
                   "baseline_ms": ms[base["run"]][0], "baseline_spread": ms[base["run"]][1],
                   **against("best_mod", tops[mode], key, base, ms),
                   "capacity": tops[mode]["capacity"], "route_every": tops[mode]["route_every"]}
            if matches[mode]:
                row.update(against("matching_mod", matches[mode], key, base, ms))
            out.append(row)
    return out


def draw_isoflop(ax, rows, kind, colors):
    """Loss (val or train) against non-embedding parameters, one color per budget; the
    baseline's 1-layer and deeper models as two lines (joined, the shapes would zigzag), one
    star each curve."""
    curves = (("baseline", f"{kind}_loss", "^-", lambda L: L == 1),
              ("baseline", f"{kind}_loss", "s-", lambda L: L > 1),
              ("mod", f"{kind}_loss", "o--", lambda L: True),
              ("mod", f"{kind}_loss_topk", "o:", lambda L: True))
    for j, budget in enumerate(sorted({r["budget"] for r in rows})):
        mine = [r for r in rows if r["budget"] == budget]
        for variant, key, style, depth in curves:
            pts = sorted((r["params"], r[key]) for r in mine
                         if r["variant"] == variant and key in r and depth(r["n_layer"]))
            if pts:
                ax.plot(*zip(*pts), style, color=colors[j], alpha=0.45 if ":" in style else 1.0,
                        markersize=4)
        for variant, key in (("baseline", f"{kind}_loss"), ("mod", f"{kind}_loss"),
                             ("mod", f"{kind}_loss_topk")):
            pts = [(r["params"], r[key]) for r in mine if r["variant"] == variant and key in r]
            ax.plot(*min(pts, key=lambda p: p[1]), "*", color=colors[j], markersize=13,
                    markeredgecolor="black", markeredgewidth=0.5,
                    alpha=0.45 if "topk" in key else 1)
    ax.set_xscale("log")
    ax.set_xlabel("non-embedding parameters")
    ax.set_ylabel(f"{kind} loss")
    ax.set_title(f"{kind} loss at equal training FLOPs (star: minimum)", fontsize=10)


def draw_wall_clock(ax, heads, runs_by_name, rows, colors):
    """Val loss against training time: the optimal baseline (solid) and the MoD that matches it
    (dashed), or where none does, the best MoD (dotted)."""
    by_size = {(r["budget"], r["variant"], size(r)): r for r in rows}
    for j, head in enumerate(h for h in heads if h["mod_eval"] == "causal"):
        mod = "matching_mod" if "matching_mod" in head else "best_mod"
        for variant, name, ms, style, note in (
                ("baseline", head["baseline"], head["baseline_ms"], "s-", "optimal"),
                ("mod", head[mod], head[f"{mod}_ms"], "o--" if mod == "matching_mod" else "o:",
                 "matching" if mod == "matching_mod" else "best, none matches")):
            log = kit.read_log(runs_by_name[by_size[(head["budget"], variant, name)]["run"]])
            log = [e for e in log if e["iter"] > 0]  # the untrained loss would set the scale
            ax.plot([e["iter"] * ms / 1000 for e in log], [e["val"]["loss"] for e in log], style,
                    color=colors[j], markersize=4,
                    label=f"{head['budget']:g}: {variant} {name} ({note})")
    ax.set_xlabel("training seconds (steps x side-by-side step time, 1 thread)")
    ax.set_ylabel("val loss (MoD: causal)")
    ax.set_title("optimal baseline vs the MoD that matches it", fontsize=10)


def draw(rows, heads, runs_by_name, path):
    plt = kit.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    draw_isoflop(axes[0], rows, "val", colors)
    draw_isoflop(axes[1], rows, "train", colors)
    draw_wall_clock(axes[2], heads, runs_by_name, rows, colors)
    from matplotlib.lines import Line2D
    budgets = sorted({r["budget"] for r in rows})
    keys = [Line2D([], [], color=colors[j], lw=4, label=f"{b:g} FLOPs")
            for j, b in enumerate(budgets)]
    keys += [Line2D([], [], color="gray", marker=m, ls=ls, markersize=4, label=what)
             for m, ls, what in (("^", "-", "baseline, 1 layer"),
                                 ("s", "-", "baseline, 2-3 layers"),
                                 ("o", "--", "MoD causal"), ("o", ":", "MoD top-k"))]
    for ax in axes[:2]:
        ax.set_ylim(top=ax.get_ylim()[1] + 0.1)  # room for the key
    axes[0].legend(handles=keys, fontsize=6, ncol=4, loc="upper center")
    axes[2].legend(fontsize=7)
    kit.save_figure(fig, path)


def main(argv=None):
    args = kit.parse_args(__doc__, PRESETS, argv)
    preset = PRESETS[args.preset]
    runs = plan(preset, args.dataset)
    train_runs = [(name, {k: v for k, v in f.items() if not k.startswith("_")}) for name, f in runs]
    if args.preset == "gpu":
        kit.confirm_gpu(train_runs, args.yes)
    out_dirs = kit.run_all(train_runs, kit.runs_dir(args, NAME))
    rows = [summarize(name, flags, out_dirs[name], f["_budget"])
            for (name, f), (_, flags) in zip(runs, train_runs)]
    kit.write_csv(rows, f"{args.results_dir}/{NAME}.csv")
    kit.print_table(rows, ["budget", "variant", "n_layer", "n_embd", "params", "steps",
                           "ms_per_step", "train_loss", "val_loss", "val_loss_topk"])
    heads = headline(rows, dict(train_runs), preset)
    kit.write_csv(heads, f"{args.results_dir}/{NAME}_headline.csv")
    kit.print_table(heads, ["budget", "mod_eval", "baseline", "baseline_loss", "baseline_ms",
                            "baseline_spread", "best_mod", "best_mod_loss", "best_mod_flops_ratio",
                            "best_mod_step_time_ratio", "matching_mod", "matching_mod_loss",
                            "matching_mod_flops_ratio", "matching_mod_step_time_ratio",
                            "matching_mod_spread"])
    draw(rows, heads, out_dirs, f"{args.assets_dir}/{NAME}.png")


if __name__ == "__main__":
    main()
