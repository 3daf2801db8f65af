"""
The clock every benchmark shares. Every model is measured in rounds, all models interleaved
within a round, so that a machine busy with something else slows them alike; the median round
counts and the spread (max - min) / median says how far to trust it.
"""

import csv
import time

import torch


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_seconds(run, n, device):
    """Median wall time of n calls of run()."""
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def interleaved(runs, repeats):
    """{name: per-round values} for {name: run() -> value}: every round calls every run once, in
    turn, so that a machine busy with something else slows all of them alike."""
    rounds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            rounds[name].append(run())
    return rounds


def median_and_spread(values):
    """The median of the rounds and their spread, (max - min) / median."""
    mid = sorted(values)[len(values) // 2]
    return mid, (max(values) - min(values)) / mid


def warn_if_noisy(spreads):
    worst = max(spreads.values())
    if worst > 0.10:
        print(f"# warning: the machine is noisy, rounds spread by up to {worst:.0%} "
              f"({max(spreads, key=spreads.get)}); trust the ratios less, or run again with "
              f"more --repeats")


def write_csv(path, rows):
    if path:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"# rows written to {path}")
