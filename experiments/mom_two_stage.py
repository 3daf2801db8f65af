"""
Mixture-of-Modules' first finding: two-stage training (a dense model first, then MoM built from
its layers) beats MoM trained from scratch. Stage 1 trains the dense model; stage 2 continues
from it, all on the same data order (same seed), as: the dense model trained on, MoM with fresh
routers (the paper), and MoM with routers started in layer order (module h at step h); MoM from
scratch trains for stage 1 + stage 2 steps. Left: val loss against steps (stage-2 runs start
where stage 1 stopped). Right: val loss against training FLOPs (stage 1's included).

    python experiments/mom_two_stage.py                 # --preset cpu
    python experiments/mom_two_stage.py --preset smoke  # seconds, for the tests
"""

import kit

NAME = "mom_two_stage"
PRESETS = {
    "smoke": {"dataset": "shakespeare_char", "stage1": 8, "stage2": 8,
              "train": dict(n_layer=2, n_head=2, n_embd=16, block_size=16, batch_size=4,
                            eval_iters=1, log_interval=1000, device="cpu")},
    # the default dense model (nanoGPT's CPU config: 4 x 4 x 128, context 64), half its steps,
    # then 500 more
    "cpu": {"dataset": "shakespeare_char", "stage1": 1000, "stage2": 500,
            "train": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                          eval_iters=10, log_interval=1000, device="cpu", compile=False)},
    # GPT-2 124M on OpenWebText: a long stage 1, a tenth of it in stage 2
    "gpu": {"dataset": "openwebtext", "stage1": 50000, "stage2": 5000,
            "train": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=12,
                          gradient_accumulation_steps=40, eval_iters=100, log_interval=100,
                          learning_rate=6e-4, min_lr=6e-5, warmup_iters=700, dtype="bfloat16")},
}
MODEL_FLAGS = ("n_layer", "n_head", "n_embd", "block_size")  # stage 2 keeps the dense model's


def plan_stage2(base, stage1_dir, steps1, steps2):
    cont = {k: v for k, v in base.items() if k not in MODEL_FLAGS}
    mom = {"variant": "mom", "modules_per_step": 1}
    return [
        ("dense-continued",
         kit.schedule({**cont, "variant": "baseline", "init_from": stage1_dir}, steps2)),
        ("two-stage-mom-fresh-routers",
         kit.schedule({**cont, **mom, "init_from": stage1_dir}, steps2)),
        ("two-stage-mom-layer-order-routers",
         kit.schedule({**cont, **mom, "init_from": stage1_dir, "router_init": "layer_order"},
                      steps2)),
        ("mom-from-scratch", kit.schedule({**base, **mom}, steps1 + steps2)),
    ]


def shared_stage1(args, own_name):
    """(preset, shared flags, runs folder, stage-1 out_dir) for a script that builds on this one's
    stage 1: the dense model is trained once, in mom_two_stage's runs folder (or --runs_dir)."""
    preset = PRESETS[args.preset]
    base = kit.common_flags(preset, args.dataset)
    shared = kit.runs_dir(args, NAME) if not args.runs_dir else kit.runs_dir(args, own_name)
    stage1 = [("stage1-dense", kit.schedule({**base, "variant": "baseline"}, preset["stage1"]))]
    return preset, base, shared, str(kit.run_all(stage1, shared)["stage1-dense"])


def curve(log, flags, fpt, offset_steps, offset_flops):
    """[(steps, training FLOPs, val loss)] of one run, shifted by what came before it."""
    per_step = fpt * kit.tokens_per_step(flags)
    return [(offset_steps + e["iter"], offset_flops + e["iter"] * per_step, e["val"]["loss"])
            for e in log]


def draw(curves, path):
    plt = kit.pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, points in curves.items():
        style = "k--" if name == "stage 1 (dense)" else "o-"
        left.plot([p[0] for p in points], [p[2] for p in points], style, label=name, markersize=3)
        right.plot([p[1] for p in points], [p[2] for p in points], style, label=name, markersize=3)
    left.set_xlabel("training steps (stage 1 + stage 2)")
    right.set_xlabel("training FLOPs (stage 1 included)")
    right.set_xscale("log")
    for ax in (left, right):
        ax.set_ylabel("val loss")
        ax.set_ylim(top=min(4.5, ax.get_ylim()[1]))
        ax.legend(fontsize=7)
    left.set_title("Mixture-of-Modules: two-stage vs from scratch")
    kit.save_figure(fig, path)


def main(argv=None):
    args = kit.parse_args(__doc__, PRESETS, argv)
    preset = PRESETS[args.preset]
    base = kit.common_flags(preset, args.dataset)
    runs_dir = kit.runs_dir(args, NAME)
    steps1, steps2 = preset["stage1"], preset["stage2"]
    stage1 = [("stage1-dense", kit.schedule({**base, "variant": "baseline"}, steps1))]
    if args.preset == "gpu":
        kit.confirm_gpu(stage1, args.yes)
    stage1_dir = str(kit.run_all(stage1, runs_dir)["stage1-dense"])
    stage2 = plan_stage2(base, stage1_dir, steps1, steps2)
    out_dirs = kit.run_all(stage2, runs_dir)
    _, fpt1 = kit.model_stats(stage1[0][1])
    flops1 = fpt1 * kit.tokens_per_step(stage1[0][1]) * steps1
    curves = {"stage 1 (dense)": curve(kit.read_log(stage1_dir), stage1[0][1], fpt1, 0, 0)}
    rows = [{**kit.summarize("stage1-dense", stage1[0][1], stage1_dir), "total_steps": steps1,
             "total_train_flops": round(flops1)}]
    for name, flags in stage2:
        _, fpt = kit.model_stats(flags)
        after_stage1 = name != "mom-from-scratch"
        points = curve(kit.read_log(out_dirs[name]), flags, fpt,
                       steps1 * after_stage1, flops1 * after_stage1)
        curves[name] = points
        rows.append({**kit.summarize(name, flags, out_dirs[name]), "total_steps": points[-1][0],
                     "total_train_flops": round(points[-1][1]),
                     "val_loss_at_stage2_start": points[0][2]})
    kit.write_csv(rows, f"{args.results_dir}/{NAME}.csv")
    kit.print_table(rows, ["run", "total_steps", "total_train_flops", "val_loss_at_stage2_start",
                           "val_loss"])
    draw(curves, f"{args.assets_dir}/{NAME}.png")


if __name__ == "__main__":
    main()
