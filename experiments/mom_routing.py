"""
What the Mixture-of-Modules routers assembled: for the two-stage MoM of mom_two_stage.py (fresh
routers, shared with it) and a val passage, which module each token took at each assembly step,
one heatmap per pool (SKIP in grey, the characters on the axis), and how often each module
(and SKIP) is taken at each step over 64 val windows.

    python experiments/mom_routing.py                 # --preset cpu
                                                      # (trains mom_two_stage's runs if needed)
    python experiments/mom_routing.py --preset smoke  # seconds, for the tests
"""

import kit
import mom_two_stage

import numpy as np
import torch

NAME = "mom_routing"
RUN = "two-stage-mom-fresh-routers"


@torch.no_grad()
def choices(model, idx):
    """{pool: (H, B, T) module index of each token's first choice} of the first routed chunk."""
    model(idx)
    record = model.last_routing[0]
    return {pool: record[pool][..., 0] for pool in ("attn", "ffn")}


def draw(passage_choices, usage, pool_sizes, text, path):
    plt = kit.pyplot()
    if plt is None:
        return
    from matplotlib.colors import ListedColormap
    fig, axes = plt.subplots(2, 2, figsize=(13, 6), gridspec_kw={"width_ratios": [3, 1]})
    for row, pool in enumerate(("attn", "ffn")):
        n = pool_sizes[pool]
        # SKIP last, grey
        colours = [plt.cm.tab10(i % 10) for i in range(n)] + [(0.8, 0.8, 0.8, 1.0)]
        grid = passage_choices[pool][:, 0].numpy()  # (H, T)
        ax = axes[row, 0]
        ax.imshow(grid, aspect="auto", cmap=ListedColormap(colours), vmin=-0.5, vmax=n + 0.5,
                  interpolation="nearest")
        ax.set_yticks(range(grid.shape[0]), [f"step {h}" for h in range(grid.shape[0])])
        ax.set_xticks(range(len(text)), [c if c != "\n" else "\\n" for c in text], fontsize=6)
        ax.set_title(f"{pool} pool: module each token took "
                     f"(colour = module 0..{n - 1}, grey = SKIP)")
        ax = axes[row, 1]
        shares = usage[pool]  # (H, n + 1)
        bottom = np.zeros(shares.shape[0])
        for m in range(n + 1):
            ax.barh(range(shares.shape[0]), shares[:, m], left=bottom, color=colours[m],
                    label="SKIP" if m == n else f"module {m}")
            bottom += shares[:, m]
        ax.set_yticks(range(shares.shape[0]), [f"step {h}" for h in range(shares.shape[0])])
        ax.invert_yaxis()
        ax.set_title(f"{pool}: share of tokens (64 val windows)")
        ax.legend(fontsize=6, loc="lower right")
    kit.save_figure(fig, path)


def main(argv=None):
    args = kit.parse_args(__doc__, mom_two_stage.PRESETS, argv)
    preset, base, shared, stage1_dir = mom_two_stage.shared_stage1(args, NAME)
    stage2 = mom_two_stage.plan_stage2(base, stage1_dir, preset["stage1"], preset["stage2"])
    runs = [r for r in stage2 if r[0] == RUN]
    out_dir = kit.run_all(runs, shared)[RUN]
    import checkpoint
    model, _ = checkpoint.load_model(out_dir)
    model.eval()
    folder = checkpoint.data_dir(runs[0][1]["dataset"])
    itos = checkpoint.read_meta(folder)["itos"]
    T = model.config.block_size
    val = torch.from_numpy(np.fromfile(folder / "val.bin", dtype=np.uint16).astype(np.int64))
    windows = min(64, len(val) // T)
    passage = choices(model, val[:T][None])
    many = choices(model, val[:windows * T].view(windows, T))
    sizes = {"attn": len(model.chunks[0].attn_pool), "ffn": len(model.chunks[0].ffn_pool)}
    usage = {pool: np.stack([np.bincount(many[pool][h].flatten().numpy(),
                                         minlength=sizes[pool] + 1) / many[pool][h].numel()
                             for h in range(many[pool].shape[0])])
             for pool in sizes}
    text = "".join(itos[int(i)] for i in val[:T])
    draw(passage, usage, sizes, text, f"{args.assets_dir}/{NAME}.png")
    row = kit.summarize(RUN, runs[0][1], out_dir)
    for pool in sizes:
        for h in range(usage[pool].shape[0]):
            row[f"{pool}_step{h}_skip"] = round(float(usage[pool][h, -1]), 4)
            row[f"{pool}_step{h}_top_module"] = int(usage[pool][h, :-1].argmax())
            row[f"{pool}_step{h}_top_share"] = round(float(usage[pool][h, :-1].max()), 4)
    kit.write_csv([row], f"{args.results_dir}/{NAME}.csv")
    kit.print_table([row], ["run", "val_loss", *[k for k in row if k.endswith("_skip")]])


if __name__ == "__main__":
    main()
