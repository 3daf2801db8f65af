"""
What every experiment script shares: run train.py, read its log.jsonl, write CSV, draw.

An experiment is a list of runs; a run is a name and a dict of train.py flags. Each run is a
separate `python train.py --key=value ...` process with its own --out_dir, so any row of a
result can be reproduced by hand with the flags the script prints. A run whose log already
reaches its last step is skipped; a run with a checkpoint but no final step is resumed
(`--init_from=resume --out_dir=...`); so an interrupted experiment continues where it stopped.

Only the preset whose results the README shows (--preset cpu) writes experiments/results/ and
assets/; smoke, gpu and any other preset write their CSV and figure under out-experiments/<preset>/,
which git ignores, so a quick try never overwrites the published results.

Parameters and FLOPs per token are computed from the model train.py builds for the same flags
(train.parse_args + train.build_model on the CPU, no training), not parsed from its output.
"""

import argparse
import csv
import json
import os
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

A100_BF16_PEAK = 312e12  # FLOP/s, for the gpu preset's estimate
ASSUMED_MFU = 0.4  # a fair share of that peak for GPT-2 small with torch.compile
PUBLISHED = "cpu"  # the preset whose CSVs and figures the README shows
SCRATCH = REPO / "out-experiments"  # git ignores it: the runs, and other presets' CSVs and figures


def parse_args(description, presets, argv=None):
    """The flags every experiment script takes. Only --preset cpu writes the published results
    (experiments/results/, assets/); any other preset writes under out-experiments/<preset>/."""
    from configurator import fail
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = fail  # a wrong flag: one line naming it, exit code 2 (not the usage block first)
    p.add_argument("--preset", choices=sorted(presets), default=PUBLISHED,
                   help=f"smoke: seconds, for the tests; {PUBLISHED}: the README's results; "
                        f"gpu: GPT-2 dims (default: {PUBLISHED})")
    p.add_argument("--dataset", default=None,
                   help="a data/ name or a folder (default: the preset's dataset)")
    p.add_argument("--runs_dir", default=None,
                   help="parent of the runs' out_dirs (default: out-experiments/<name>, "
                        "or out-experiments/<preset>/<name> for another preset)")
    p.add_argument("--results_dir", default=None,
                   help=f"where the CSV goes (default: experiments/results for --preset "
                        f"{PUBLISHED}, else out-experiments/<preset>/results)")
    p.add_argument("--assets_dir", default=None,
                   help=f"where the figure goes (default: assets for --preset {PUBLISHED}, "
                        f"else out-experiments/<preset>/assets)")
    p.add_argument("--yes", action="store_true",
                   help="start a gpu preset without asking (default: ask)")
    args = p.parse_args(argv)
    published = args.preset == PUBLISHED
    args.runs_root = SCRATCH if published else SCRATCH / args.preset
    if published:
        args.results_dir = args.results_dir or REPO / "experiments" / "results"
        args.assets_dir = args.assets_dir or REPO / "assets"
        print(f"--preset {PUBLISHED}: the README's results; the CSV and figure replace those in "
              f"{shown(args.results_dir)}/ and {shown(args.assets_dir)}/")
    else:
        args.results_dir = args.results_dir or args.runs_root / "results"
        args.assets_dir = args.assets_dir or args.runs_root / "assets"
        print(f"--preset {args.preset}: the CSV and figure go to {shown(args.results_dir)}/ and "
              f"{shown(args.assets_dir)}/ (only --preset {PUBLISHED} writes the published results)")
    return args


def shown(path):
    """A path as the user would type it: relative to the repository when inside it."""
    return str(path).removeprefix(f"{REPO}/")


def flag_list(flags):
    return [f"--{k}={v}" for k, v in flags.items()]


def model_stats(flags):
    """(non-embedding parameters, training FLOPs per token) of the model these flags build.
    Non-embedding: every parameter but the token and position embeddings (the LM head is tied
    to the token embedding, so it is not counted either)."""
    import train
    cfg, settings, _ = train.parse_args(
        flag_list({k: v for k, v in flags.items() if k != "out_dir"}))
    model = train.build_model(cfg, settings)
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    params = sum(p.numel() for p in model.parameters()) - embeddings
    return params, model.flops_per_token()


def tokens_per_step(flags):
    return (flags.get("batch_size", 12) * flags.get("gradient_accumulation_steps", 1)
            * flags.get("block_size", 64))


def steps_for_budget(budget, flops_per_token, flags, evals=4):
    """budget / (FLOPs per token x tokens per step), rounded to a multiple of `evals` so that
    the last step is also an evaluation (eval_interval = steps / evals)."""
    steps = budget / (flops_per_token * tokens_per_step(flags))
    return max(evals, evals * round(steps / evals))


def read_log(out_dir):
    path = Path(out_dir) / "log.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def is_finished(out_dir, max_iters):
    log = read_log(out_dir)
    return bool(log) and log[-1]["iter"] >= max_iters


def run_all(runs, runs_dir):
    """Run each (name, flags) through train.py unless finished; returns {name: out_dir}.
    Prints one progress line per run with an ETA from the seconds per FLOP seen so far."""
    runs_dir = Path(runs_dir)
    costs = []
    for name, flags in runs:
        _, fpt = model_stats(flags)
        costs.append(fpt * tokens_per_step(flags) * flags["max_iters"])
    out_dirs, spent_seconds, spent_flops = {}, 0.0, 0.0
    for i, ((name, flags), cost) in enumerate(zip(runs, costs)):
        out_dir = runs_dir / name
        out_dirs[name] = out_dir
        left = sum(costs[i:])
        eta = f", ETA {left * spent_seconds / spent_flops / 60:.1f} min" if spent_flops else ""
        if is_finished(out_dir, flags["max_iters"]):
            print(f"[run {i + 1}/{len(runs)}] {name}: finished earlier, skipped")
            continue
        argv = flag_list({**flags, "out_dir": out_dir})
        if (out_dir / "ckpt.pt").exists():
            argv.append("--init_from=resume")
            action = "resuming"
        else:
            # a run stopped before its first checkpoint starts over
            (out_dir / "log.jsonl").unlink(missing_ok=True)
            action = "starting"
        print(f"[run {i + 1}/{len(runs)}] {name}: {action}{eta}\n"
              f"  python train.py {' '.join(argv)}", flush=True)
        t0, cpu0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        run_train(name, argv)
        spent_seconds += time.time() - t0
        spent_flops += cost
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
        # CPU seconds: what the run costs on a machine it does not share
        # (wall time depends on the load)
        print(f"  done in {time.time() - t0:.0f}s wall, {cpu:.0f} CPU seconds", flush=True)
    return out_dirs


def run_train(name, argv):
    """Run train.py with these flags in a subprocess; exit with its stderr if it fails."""
    # one thread unless the caller says otherwise: these tiny models gain little from a second
    # one, and on a shared machine two threads spend most of their time waiting for each other
    env = {"OMP_NUM_THREADS": "1", **os.environ}
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"run {name} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")


def summarize(name, flags, out_dir):
    """One CSV row: the run's flags, its size and cost, and its last evaluation's val metrics."""
    params, fpt = model_stats(flags)
    log = read_log(out_dir)
    last = log[-1]
    steps = last["iter"]
    row = {"run": name, **flags, "params": params, "flops_per_token": round(fpt),
           "steps": steps, "tokens": steps * tokens_per_step(flags),
           "train_flops": round(steps * tokens_per_step(flags) * fpt),
           "train_seconds": round(last["train_seconds"], 2),
           "ms_per_step": round(1000 * last["train_seconds"] / max(steps, 1), 2)}
    row.update({f"val_{k}": v for k, v in last["val"].items()})
    return row


def write_csv(rows, path):
    """All rows share one header: the union of their keys, in first-seen order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = list(dict.fromkeys(k for row in rows for k in row))
    # paths inside the repository (a run's --init_from) are written relative to it
    rows = [{k: (shown(v) if isinstance(v, (str, Path)) else v) for k, v in row.items()}
            for row in rows]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def print_table(rows, columns):
    def show(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)
    cells = [[show(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[j]) for r in cells)) for j, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def pyplot():
    """matplotlib.pyplot on a file backend, or None (the CSV and table still come out)."""
    from configurator import import_optional
    plt, why_not = import_optional("matplotlib.pyplot")
    if plt is None:
        print(f"no figure: {why_not}")
        return None
    plt.switch_backend("Agg")
    return plt


def save_figure(fig, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def confirm_gpu(runs, yes):
    """The gpu preset states its cost before it spends it."""
    total = 0.0
    for _, flags in runs:
        total += model_stats(flags)[1] * tokens_per_step(flags) * flags["max_iters"]
    hours = total / (A100_BF16_PEAK * ASSUMED_MFU) / 3600
    print(f"{len(runs)} runs, {total:.3g} training FLOPs: about {hours:.1f} A100-hours "
          f"(estimate at {ASSUMED_MFU:.0%} of the {A100_BF16_PEAK / 1e12:.0f} TFLOP/s bf16 peak)")
    if not yes and input("start? [y/N] ").strip().lower() != "y":
        raise SystemExit(0)


def runs_dir(args, name):
    return Path(args.runs_dir) if args.runs_dir else args.runs_root / name


def common_flags(preset, dataset):
    """The train.py flags every run of a preset shares (sizes, steps and variant come on top)."""
    flags = dict(preset["train"])
    flags["dataset"] = dataset or preset["dataset"]
    return flags


def schedule(flags, steps, evals=4):
    """max_iters and the flags that follow from it: eval at every steps/evals, cosine to the end."""
    return {**flags, "max_iters": steps, "lr_decay_iters": steps,
            "eval_interval": max(1, steps // evals),
            "warmup_iters": min(flags.get("warmup_iters", 100), steps // 10)}


def isfinite(x):
    return isinstance(x, float) and math.isfinite(x)
