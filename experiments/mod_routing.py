"""
What the Mixture-of-Depths router learned, the paper's routing figures, for one trained MoD model
(capacity 0.125, every other block): (a) for a val passage, which tokens each routed block
processed, top-k (training) and causal (sampling) side by side, the characters on the axis;
(b) sigmoid(r) of the tokens top-k routed against those it did not; (c) causal routing's
precision and recall against top-k membership over training, read from log.jsonl.

    python experiments/mod_routing.py                 # --preset cpu
    python experiments/mod_routing.py --preset smoke  # seconds, for the tests

The trained model is read through a small surface of mod.py: MoDGPT.routing(mode),
.routed_blocks(), and on each routed block its `router` (the Linear giving r) and `routed_mask`
after a forward.
"""


import numpy as np
import torch

import kit

NAME = "mod_routing"
PRESETS = {
    "smoke": {"dataset": "shakespeare_char", "steps": 8, "evals": 4, "windows": 4,
              "train": dict(n_layer=2, n_head=2, n_embd=16, block_size=16, batch_size=4,
                            eval_iters=1, log_interval=1000, device="cpu")},
    "cpu": {"dataset": "shakespeare_char", "steps": 1500, "evals": 15, "windows": 64,
            "train": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12,
                          eval_iters=10, log_interval=1000, device="cpu", compile=False)},
    "gpu": {"dataset": "openwebtext", "steps": 20000, "evals": 40, "windows": 64,
            "train": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch_size=12,
                          gradient_accumulation_steps=40, eval_iters=100, log_interval=100,
                          learning_rate=6e-4, min_lr=6e-5, warmup_iters=700, dtype="bfloat16")},
}


@torch.no_grad()
def routing_of(model, x):
    """{mode: {block index: (B, T) routed mask}} and each block's sigmoid(r) (B, T), top-k mode."""
    scores, hooks = {}, []
    for i, block in model.routed_blocks().items():
        hooks.append(block.router.register_forward_hook(
            lambda mod, inp, out, i=i: scores.__setitem__(i, torch.sigmoid(out.squeeze(-1)))))
    masks = {}
    for mode in ("topk", "causal"):
        with model.routing(mode):
            model(x)
        masks[mode] = {i: b.routed_mask.clone() for i, b in model.routed_blocks().items()}
        if mode == "topk":
            gates = dict(scores)
    for h in hooks:
        h.remove()
    return masks, gates


def draw(model, val, itos, windows, log, path):
    plt = kit.pyplot()
    if plt is None:
        return {}
    T = model.config.block_size
    passage = val[:T].unsqueeze(0)
    masks, _ = routing_of(model, passage)
    batch = torch.stack([val[i * T:(i + 1) * T] for i in range(windows)])
    batch_masks, gates = routing_of(model, batch)
    blocks = sorted(masks["topk"])
    fig = plt.figure(figsize=(13, 7))
    grid = fig.add_gridspec(2, 2)
    chars = [repr(itos[int(t)])[1:-1] or " " for t in passage[0]]
    for col, mode in enumerate(("topk", "causal")):
        ax = fig.add_subplot(grid[0, col])
        image = np.stack([masks[mode][i][0].float().numpy() for i in blocks])
        ax.imshow(image, aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.set_yticks(range(len(blocks)), [f"block {i}" for i in blocks])
        ax.set_xticks(range(T), chars, fontsize=6, fontfamily="monospace")
        share = image.mean()
        ax.set_title(f"{'top-k' if mode == 'topk' else 'causal'} routing (black: processed), "
                     f"{share:.0%} of tokens")
    ax = fig.add_subplot(grid[1, 0])
    routed = torch.cat([gates[i][batch_masks["topk"][i]] for i in blocks]).numpy()
    unrouted = torch.cat([gates[i][~batch_masks["topk"][i]] for i in blocks]).numpy()
    bins = np.linspace(0, 1, 41)
    ax.hist(unrouted, bins=bins, alpha=0.6, density=True, label=f"not in top-k ({len(unrouted)})")
    ax.hist(routed, bins=bins, alpha=0.6, density=True, label=f"in top-k ({len(routed)})")
    ax.axvline(0.5, color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("sigmoid(r): causal routing takes a token iff > 0.5")
    ax.set_ylabel("density")
    ax.set_title(f"router output on {windows} val windows, all routed blocks")
    ax.legend(fontsize=8)
    draw_causal_vs_topk(fig.add_subplot(grid[1, 1]), log)
    kit.save_figure(fig, path)
    return {f"routed_frac_passage_{mode}":
                float(np.mean([masks[mode][i].float().mean() for i in blocks]))
            for mode in masks}


def draw_causal_vs_topk(ax, log):
    """(c): causal routing's precision and recall against top-k membership over training."""
    keys = sorted(k for k in log[-1]["val"]
                  if k.startswith(("causal_precision_", "causal_recall_")))
    for k in keys:
        ax.plot([e["iter"] for e in log], [e["val"].get(k, np.nan) for e in log],
                "o-" if "precision" in k else "s--", label=k)
    if keys:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "log.jsonl has no causal_precision_* / causal_recall_*", ha="center",
                transform=ax.transAxes)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("training step")
    ax.set_title("causal routing vs top-k membership (val)")


def main(argv=None):
    args = kit.parse_args(__doc__, PRESETS, argv)
    preset = PRESETS[args.preset]
    flags = {**kit.common_flags(preset, args.dataset), "variant": "mod", "capacity": 0.125,
             "route_every": 2}
    runs = [("mod-C0.125-every2", kit.schedule(flags, preset["steps"], preset["evals"]))]
    if args.preset == "gpu":
        kit.confirm_gpu(runs, args.yes)
    out_dirs = kit.run_all(runs, kit.runs_dir(args, NAME))
    import checkpoint
    name, flags = runs[0]
    model, ckpt = checkpoint.load_model(out_dirs[name])
    model.eval()
    folder = checkpoint.data_dir(flags["dataset"])
    itos = checkpoint.read_meta(folder)["itos"]
    val = torch.from_numpy(np.fromfile(folder / "val.bin", dtype=np.uint16).astype(np.int64))
    windows = min(preset["windows"], len(val) // model.config.block_size)
    extra = draw(model, val, itos, windows, kit.read_log(out_dirs[name]),
                 f"{args.assets_dir}/{NAME}.png")
    rows = [{**kit.summarize(name, flags, out_dirs[name]), **extra}]
    kit.write_csv(rows, f"{args.results_dir}/{NAME}.csv")
    kit.print_table(rows, ["run", "steps", "val_loss", "val_loss_topk", *extra])


if __name__ == "__main__":
    main()
