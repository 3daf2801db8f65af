"""
Where Mixture-of-Depths' training step goes on a CPU, and why small models fall short of the
FLOP ceiling (baseline FLOPs / MoD FLOPs per step). MoD's step is split in three:

    MoD = unrouted part + routed blocks on k tokens + routing

unrouted part: a baseline of the same width without the routed blocks (embeddings, the other
blocks, LM head, loss, AdamW); routed blocks on k tokens: as many dense blocks fed only
k = C T tokens per row (forward, backward, AdamW), what the routed blocks would cost with routing
free; routing: the rest (router, top-k, mask, BCE, the gathers and the weighted scatter). MoD
reaches 85% of its ceiling when its step is at most baseline / (0.85 x ceiling).

Time is the CPU time of the one thread that runs the step (time.thread_time): a busy machine
slows wall time by whatever else runs, CPU time far less. The four steps are timed in
interleaved rounds (each round runs each of them in turn); median and spread of the rounds.
Untrained models on random tokens at the isoFLOP sweep's batch and context.

    python experiments/mod_step_floor.py                 # --preset cpu
    python experiments/mod_step_floor.py --preset smoke  # seconds, for the tests
"""

import time

import torch

import kit

NAME = "mod_step_floor"
MOD_FLAGS = ["--capacity=0.125", "--route_every=2"]
PRESETS = {  # sizes: (layers, heads, width); rounds of `steps` steps each
    "smoke": {"sizes": [(2, 2, 16)], "rounds": 1, "steps": 1, "batch_size": 2, "block_size": 16},
    # the isoFLOP sweep's sizes with 2 layers, wider ones, and 3 x 96 / 4 x 128 for the ladder
    "cpu": {"sizes": [(2, 2, 32), (2, 2, 48), (2, 2, 64), (2, 3, 96), (2, 4, 128), (3, 3, 96),
                      (4, 4, 128)],
            "rounds": 9, "steps": 10, "batch_size": 12, "block_size": 64},
}
PARTS = {"unrouted": "unrouted part", "routed": "routed blocks on k tokens", "routing": "routing"}


def dense_blocks_step(config, n_blocks, batch_size, k):
    """One step of n_blocks dense blocks on (batch_size, k) tokens: forward, backward, AdamW."""
    from model import Block
    blocks = torch.nn.ModuleList(Block(config) for _ in range(n_blocks))
    optimizer = torch.optim.AdamW(blocks.parameters(), lr=1e-4, fused=True)  # as train.py's
    x = torch.randn(batch_size, k, config.n_embd, requires_grad=True)

    def step():
        out = x
        for block in blocks:
            out = block(out)
        out.sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def steps_of(n_layer, n_head, n_embd, preset):
    """{name: one training step} for the baseline, MoD and MoD's parts; MoD's model."""
    import bench
    from benchmarks.training import build, training_step
    from model import GPTConfig
    cfg, settings = bench.parse_args(["--variants=baseline,mod", *MOD_FLAGS, "--vocab_size=65",
                                      f"--batch_size={preset['batch_size']}",
                                      f"--block_size={preset['block_size']}"])
    off = torch.autocast("cpu", enabled=False)

    def config(layers):
        return GPTConfig(block_size=cfg.block_size, vocab_size=65, n_layer=layers,
                         n_head=n_head, n_embd=n_embd)
    mod = build("mod", settings["mod"], config(n_layer), cfg.seed)
    routed = len(mod.routed_blocks())
    k = round(settings["mod"].capacity * cfg.block_size)
    def baseline(layers):
        return build("baseline", None, config(layers), cfg.seed)
    steps = {"baseline": training_step(baseline(n_layer), cfg, "cpu", off)[0],
             "mod": training_step(mod, cfg, "cpu", off)[0],
             "unrouted part": training_step(baseline(n_layer - routed), cfg, "cpu", off)[0],
             "routed blocks on k tokens": dense_blocks_step(config(n_layer), routed,
                                                            cfg.batch_size, k)}
    return steps, mod


def cpu_ms(steps, preset):
    """{name: (median, spread)} of the CPU milliseconds per step, rounds interleaved."""
    for step in steps.values():
        step(), step()  # warm up
    rounds = {name: [] for name in steps}
    for _ in range(preset["rounds"]):
        for name, step in steps.items():
            start = time.thread_time()
            for _ in range(preset["steps"]):
                step()
            rounds[name].append(1000 * (time.thread_time() - start) / preset["steps"])
    out = {}
    for name, values in rounds.items():
        mid = sorted(values)[len(values) // 2]
        out[name] = (mid, (max(values) - min(values)) / mid)
    return out


def measure(size, preset):
    n_layer, n_head, n_embd = size
    steps, mod = steps_of(n_layer, n_head, n_embd, preset)
    ms = cpu_ms(steps, preset)
    ceiling = mod.flop_ceiling()
    row = {"size": f"L{n_layer}-d{n_embd}", "n_layer": n_layer, "n_head": n_head,
           "n_embd": n_embd, "baseline_ms": ms["baseline"][0], "mod_ms": ms["mod"][0]}
    row.update({f"{key}_ms": ms[PARTS[key]][0] for key in ("unrouted", "routed")})
    row["routing_ms"] = row["mod_ms"] - row["unrouted_ms"] - row["routed_ms"]
    row.update(speed=row["baseline_ms"] / row["mod_ms"], flop_ceiling=ceiling,
               needed_ms=row["baseline_ms"] / (0.85 * ceiling),
               spread=max(spread for _, spread in ms.values()))
    row["of_ceiling"] = row["speed"] / ceiling
    return row


def draw(rows, path):
    """Per size, MoD's step split in its parts, as a fraction of the baseline's step."""
    plt = kit.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for i, row in enumerate(rows):
        base = row["baseline_ms"]
        ax.bar(i - 0.2, 1.0, 0.38, color="0.6", label="baseline" if not i else None)
        bottom = 0.0
        for (key, part), color in zip(PARTS.items(), ("C0", "C1", "C3")):
            ax.bar(i + 0.2, row[f"{key}_ms"] / base, 0.38, bottom=bottom, color=color,
                   label=f"MoD: {part}" if not i else None)
            bottom += row[f"{key}_ms"] / base
        ax.plot([i + 0.01, i + 0.39], [row["needed_ms"] / base] * 2, "k--", lw=1.2,
                label="MoD at 85% of its FLOP ceiling" if not i else None)
        ax.text(i + 0.2, bottom, f"{row['of_ceiling']:.0%}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(rows)), [row["size"] for row in rows])
    ax.set_ylabel("training step / the baseline's (CPU time)")
    ax.set_title("MoD's training step, split (label: % of its FLOP ceiling)", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    kit.save_figure(fig, path)


def main(argv=None):
    args = kit.parse_args(__doc__, PRESETS, argv)
    preset = PRESETS[args.preset]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the isoFLOP runs use
    rows = [measure(size, preset) for size in preset["sizes"]]
    torch.set_num_threads(threads)
    kit.write_csv(rows, f"{args.results_dir}/{NAME}.csv")
    kit.print_table(rows, ["size", "baseline_ms", "mod_ms", "unrouted_ms", "routed_ms",
                           "routing_ms", "speed", "flop_ceiling", "of_ceiling", "needed_ms",
                           "spread"])
    draw(rows, f"{args.assets_dir}/{NAME}.png")


if __name__ == "__main__":
    main()
