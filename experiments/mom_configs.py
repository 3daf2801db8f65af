"""
Mixture-of-Modules' named settings side by side, each trained in stage 2 from the same dense
model (stage 1 of mom_two_stage.py, shared with it) for the same steps: the dense model trained
on; MoM with H = L, K = 1; the paper's "deep" setting (more steps than layers); its "efficient"
setting (fewer steps, two modules per step); the module-removal ablation (pools keeping half the
attention modules and three quarters of the FFN modules); and the official code's layout (dense
bottom and top layers around the routed middle). Scatter: val loss against the FLOPs per token
the routing actually took on the val batches, each point labelled with its ms per step.

    python experiments/mom_configs.py                 # --preset cpu
                                                      # (runs mom_two_stage's stage 1 if needed)
    python experiments/mom_configs.py --preset smoke  # seconds, for the tests
"""

import kit
import mom_two_stage

NAME = "mom_configs"
# (run name, MoM flags as functions of the dense model's n_layer L); config/mom_*.py hold the same
SETTINGS = [
    ("mom-H=L-K1", lambda L: {}),
    ("mom-deep-H=1.5L", lambda L: {"assembly_steps": L * 3 // 2}),
    ("mom-efficient-H=L/2-K2", lambda L: {"assembly_steps": L // 2, "modules_per_step": 2}),
    ("mom-module-removal-attn50-ffn75",
     lambda L: {"n_attn_modules": L // 2, "n_ffn_modules": L * 3 // 4}),
    ("mom-official-layout-dense-bottom-top",
     lambda L: {"bottom_layers": L // 4, "top_layers": L // 4}),
]


def draw(rows, path):
    plt = kit.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        x = r.get("val_flops_per_token") or r["flops_per_token"]
        ax.scatter(x, r["val_loss"], marker="s" if r["variant"] == "baseline" else "o")
        ax.annotate(f"{r['run']}\n{r['ms_per_step']:.0f} ms/step", (x, r["val_loss"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.margins(x=0.08, y=0.12)  # room for the labels above and right of each point
    ax.set_xlabel("training FLOPs per token the routing took (val)")
    ax.set_ylabel("val loss")
    ax.set_title("Mixture-of-Modules settings, stage 2 from one dense model")
    kit.save_figure(fig, path)


def main(argv=None):
    args = kit.parse_args(__doc__, mom_two_stage.PRESETS, argv)
    preset, base, _, stage1_dir = mom_two_stage.shared_stage1(args, NAME)
    cont = {k: v for k, v in base.items() if k not in mom_two_stage.MODEL_FLAGS}
    L = base["n_layer"]
    dense = {**cont, "variant": "baseline", "init_from": stage1_dir}
    runs = [("dense-continued", kit.schedule(dense, preset["stage2"]))]
    for name, settings in SETTINGS:
        flags = {**cont, "variant": "mom", "init_from": stage1_dir, **settings(L)}
        runs.append((name, kit.schedule(flags, preset["stage2"])))
    if args.preset == "gpu":
        kit.confirm_gpu(runs, args.yes)
    out_dirs = kit.run_all(runs, kit.runs_dir(args, NAME))
    rows = [kit.summarize(name, flags, out_dirs[name]) for name, flags in runs]
    kit.write_csv(rows, f"{args.results_dir}/{NAME}.csv")
    kit.print_table(rows, ["run", "steps", "ms_per_step", "val_loss", "val_flops_per_token",
                           "val_skip_rate"])
    draw(rows, f"{args.assets_dir}/{NAME}.png")


if __name__ == "__main__":
    main()
