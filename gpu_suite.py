"""
The whole GPU check and its measurements in one command, within a wall-clock budget.

    python gpu_suite.py --out_dir=gpu_results                  # one CUDA GPU: GPT-2 124M dims, bf16
    python gpu_suite.py --device=cpu --out_dir=/tmp/gpu_dry    # dry run: tiny dims, every code path

Each part runs in a process of its own (gpu_jobs.py says what each measures), so a crash, a
hang or a slow compile costs that part alone. Two phases:
1. checks, side by side, nothing timed: tests/test_cuda.py under pytest; graph breaks per variant
   (torch._dynamo.explain); the first compile of every compiled row, which fills torch.compile's
   on-disk caches so that the timed run in phase 2 finds its kernels there.
2. measurements, one at a time: every variant's training step eager, then compiled (baseline and
   MoD first), then cached decoding against transformers' generate.
The plan and an estimate print first. A part that would end past --budget_s is skipped, one
that overruns is stopped, and what was measured is written anyway: results.json (everything,
with the machine and versions), training.csv, decode.csv, graph_breaks.csv, summary.md, and
logs/ (each process's output). No network, no data files: random tokens.
"""

import csv
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from configurator import build, check_output_folder, fail, parse_value, read_flags
from gpu_jobs import VARIANTS

ROOT = Path(__file__).resolve().parent
# pure-Python packages the tests need where the GPU machine lacks them (`pip install --target
# .gpu_vendor pytest`; ignored by git, sent along with the tree), found after installed ones
VENDOR = ROOT / ".gpu_vendor"
GPT2_124M = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, dropout=0.0)
TESTS = "tests/test_cuda.py"
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=128, dropout=0.0)


@dataclass
class SuiteConfig:
    out_dir: str = "gpu_results"  # results.json, the CSVs, summary.md and logs/ go here
    device: str = "cuda"  # cuda: GPT-2 124M dims, bf16 | cpu: a dry run at tiny dims, fp32
    budget_s: float = 420.0  # wall clock for everything; parts that would not fit are skipped
    batch_size: int = 0  # training batch; 0: 8 sequences of 1,024 tokens on cuda, 2 on cpu
    steps: int = 10  # timed training steps per row (the median counts), after 3 warmup steps
    new_tokens: int = 0  # decoded tokens per generation; 0: 128 on cuda, 4 on cpu
    peak_tflops: float = 989.0  # MFU's denominator: H200 (and H100) SXM dense bf16 tensor-core peak
    # compiled rows, in order of priority ("mod:triton": MoD with its Triton kernels)
    compiled: str = "baseline,mod,mod:triton,router_tuning,mom"
    variants: str = "all"  # variants measured eager and decoded: all, or a comma list

    def __post_init__(self):
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"--device must be cuda or cpu, got {self.device!r}")
        for flag in ("budget_s", "steps", "peak_tflops"):
            if not getattr(self, flag) > 0:
                raise ValueError(f"--{flag} must be > 0, got {getattr(self, flag)}")
        if self.batch_size < 0 or self.new_tokens < 0:
            raise ValueError("--batch_size and --new_tokens must be >= 0 (0: the device's default)")


@dataclass
class Job:
    name: str
    command: list
    estimate_s: float  # on the device it is planned for (a guess until measured; README says how)
    out: Path = None  # the JSON the job writes
    status: str = "planned"  # planned | passed | failed | timed out | skipped: ...
    seconds: float = 0.0
    process: subprocess.Popen = None
    started: float = 0.0


def parse_args(argv):
    own = {f.name: f for f in SuiteConfig.__dataclass_fields__.values()}
    values = {}
    for key, text in read_flags(argv, __doc__, [("suite", SuiteConfig)]).items():
        if key not in own:
            fail(f"unknown flag --{key}. Valid: {', '.join(own)}")
        values[key] = parse_value(text, own[key])
    cfg = build(SuiteConfig, values)
    names = list(VARIANTS) if cfg.variants == "all" else cfg.variants.split(",")
    for name in names + [c.split(":")[0] for c in cfg.compiled.split(",") if c]:
        if name not in VARIANTS:
            fail(f"--variants / --compiled: unknown variant {name!r}; "
                 f"choose from {', '.join(VARIANTS)}")
    check_compiled(cfg.compiled)
    check_output_folder("--out_dir", cfg.out_dir)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        fail("--device=cuda: no CUDA GPU is visible to PyTorch; use --device=cpu for the dry run")
    return cfg, names


def check_compiled(compiled):
    """A compiled case is a variant, or variant:kernels for one whose settings have kernels."""
    for case in filter(None, compiled.split(",")):
        name, colon, kernels = case.partition(":")
        settings_cls = VARIANTS[name][1]
        has_kernels = settings_cls is not None and "kernels" in settings_cls.__dataclass_fields__
        if colon and not has_kernels:
            fail(f"--compiled: {name} has no kernels setting; write {name!r} without ':{kernels}'")
        if colon and kernels not in ("torch", "triton"):
            fail(f"--compiled: {case!r} names kernels {kernels!r}; use torch or triton "
                 f"(e.g. {name}:triton)")


# --- the plan ---------------------------------------------------------------------------------

def job_args(cfg, **extra):
    """What every job of this run shares, plus its own."""
    cuda = cfg.device == "cuda"
    return dict(device=cfg.device, dims=GPT2_124M if cuda else TINY,
                dtype="bfloat16" if cuda else "float32",
                batch_size=cfg.batch_size or (8 if cuda else 2), peak_tflops=cfg.peak_tflops,
                **extra)


def train_job(cfg, out, cases, compiled, warm_only=False):
    """Training rows measured in one process; a case is a variant name, or "mod:triton" for MoD
    with its kernels."""
    cuda = cfg.device == "cuda"
    mode = "compiled" if compiled else "eager"
    label = f"{'warm' if warm_only else 'train'} {mode} {','.join(cases)}"
    pairs = [[name, kernels or "torch"] for name, _, kernels in (c.partition(":") for c in cases)]
    args = job_args(cfg, cases=pairs, compile=compiled, warm_only=warm_only,
                    backend="inductor" if cuda else "eager",  # a CPU dry run compiles no C++
                    steps=cfg.steps if cuda else 2, warmup=3 if cuda else 1)
    per_case = (90 if warm_only else 30 if compiled else 8) if cuda else 8
    return make_job(out, label, "train", args, per_case * len(cases) + (10 if cuda else 5))


def slug(label):
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def make_job(out, label, kind, args, estimate):
    """A job running gpu_jobs.py KIND on its args; the JSON it writes is job.out."""
    (out / "jobs").mkdir(parents=True, exist_ok=True)
    args_file = out / "jobs" / f"{slug(label)}.args.json"
    result = out / "jobs" / f"{slug(label)}.json"
    args_file.write_text(json.dumps(args))
    command = [sys.executable, str(ROOT / "gpu_jobs.py"), kind, str(args_file), str(result)]
    return Job(label, command, estimate, result)


def plan(cfg, names, out):
    """(checks, measurements): the jobs of phase 1 (side by side) and phase 2 (one at a time)."""
    cuda = cfg.device == "cuda"
    compiled = [c for c in cfg.compiled.split(",") if c]
    pytest = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(ROOT / TESTS)]
    cases = [[n, "torch"] for n in names] + [["mod", "triton"]]
    checks = [Job(TESTS, pytest, 150 if cuda else 10),
              make_job(out, "graph breaks", "graph_breaks", job_args(cfg, cases=cases),
                       40 if cuda else 15)]
    # compiled rows one process each: a compile that hangs or crashes takes no other row with it
    checks += [train_job(cfg, out, [case], True, warm_only=True) for case in compiled]
    eager = [train_job(cfg, out, names + ["mod:triton"], False)]
    timed_compiled = [train_job(cfg, out, [case], True) for case in compiled]
    decode_args = job_args(cfg, variants=names, batches=[1, 8] if cuda else [1, 2],
                           new_tokens=cfg.new_tokens or (128 if cuda else 4),
                           repeats=2 if cuda else 1)
    decode = make_job(out, "decode", "decode", decode_args, 60 if cuda else 10)
    # the baseline and MoD compiled before decoding, the other compiled rows after it
    return checks, eager + timed_compiled[:3] + [decode] + timed_compiled[3:]


def print_plan(cfg, checks, measurements):
    phase1 = max(j.estimate_s for j in checks)
    phase2 = sum(j.estimate_s for j in measurements)
    print(f"# gpu_suite on {cfg.device}: budget {cfg.budget_s:.0f} s, "
          f"estimate {phase1 + phase2:.0f} s "
          f"(checks side by side ~{phase1:.0f} s, then measurements one at a time ~{phase2:.0f} s)")
    for phase, jobs in (("1 checks", checks), ("2 measurements", measurements)):
        print(f"# phase {phase}: " + ", ".join(f"{j.name} ~{j.estimate_s:.0f}s" for j in jobs))
    sys.stdout.flush()


# --- running the jobs ---------------------------------------------------------------------------

def start(job, out, env):
    job.started = time.time()
    log = open(out / "logs" / f"{slug(job.name)}.log", "w")
    job.process = subprocess.Popen(job.command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   env=env,
                                   start_new_session=True)
    job.log = log


def finish(job, timed_out=False):
    """Collect a job's exit; one that overran is stopped with its whole process group."""
    if timed_out:
        os.killpg(job.process.pid, 9)
    code = job.process.wait()
    job.log.close()
    job.seconds = time.time() - job.started
    job.status = "timed out" if timed_out else "passed" if code == 0 else f"failed (exit {code})"
    if code == 5 and job.name == TESTS:  # pytest: nothing collected, i.e. the module skipped itself
        job.status = "skipped: no CUDA GPU"
    print(f"  {job.name}: {job.status} in {job.seconds:.0f} s")
    sys.stdout.flush()


def run_side_by_side(jobs, out, env, deadline):
    for job in jobs:
        start(job, out, env)
    while any(j.process.poll() is None for j in jobs if j.status == "planned"):
        for job in jobs:
            if job.status == "planned" and job.process.poll() is not None:
                finish(job)
        if time.time() > deadline:
            for job in jobs:
                if job.status == "planned":
                    finish(job, timed_out=job.process.poll() is None)
        time.sleep(0.5)
    for job in jobs:
        if job.status == "planned":
            finish(job)


def run_one_at_a_time(jobs, out, env, end):
    for job in jobs:
        left = end - time.time()
        if job.estimate_s > left:
            job.status = (f"skipped: ~{job.estimate_s:.0f} s would not fit "
                          f"in the {max(0, left):.0f} s left")
            print(f"  {job.name}: {job.status}")
            continue
        start(job, out, env)
        try:
            job.process.wait(timeout=left)
            finish(job)
        except subprocess.TimeoutExpired:
            finish(job, timed_out=True)


# --- what was measured ----------------------------------------------------------------------------

def environment(cfg):
    from importlib import metadata

    def version(package):
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    cuda = cfg.device == "cuda"
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "python": platform.python_version(), "torch": torch.__version__,
            "triton": version("triton"), "transformers": version("transformers"),
            "device": torch.cuda.get_device_name() if cuda else f"CPU, {os.cpu_count()} cores",
            "cuda": torch.version.cuda if cuda else None, "peak_tflops": cfg.peak_tflops,
            "command": " ".join(["python", "gpu_suite.py", *sys.argv[1:]])}


def test_results(log_path):
    """pytest -v's per-test outcomes and its closing counts, read from its log (also when the
    run was stopped half way: the lines written so far count)."""
    text = log_path.read_text() if log_path.exists() else ""
    outcomes = dict(re.findall(r"::(\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)", text))
    closing = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text)
    counts = {kind: int(n) for n, kind in closing}
    return {"counts": counts, "outcomes": outcomes,
            "failed": sorted(n for n, result in outcomes.items() if result in ("FAILED", "ERROR"))}


def training_rows(jobs):
    rows = [row for job in jobs if job.name.startswith("train ") and job.out.exists()
            for row in json.loads(job.out.read_text())["rows"]]
    for row in rows:  # ratios to the baseline measured the same way
        base = next((r for r in rows if r["variant"] == "baseline" and r["mode"] == row["mode"]),
                    None)
        if base:
            row["speed_x"] = row["tok_s"] / base["tok_s"]
            row["flop_ceiling_x"] = base["flops_per_token"] / row["flops_per_token"]
            row["of_ceiling"] = row["speed_x"] / row["flop_ceiling_x"]
    return rows


def write_csv(path, rows):
    if rows:
        names = list(dict.fromkeys(k for row in rows for k in row))
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=names)
            writer.writeheader()
            writer.writerows(rows)


def cell(value, form):
    return "-" if value is None else format(value, form)


def table(header, rows):
    """A markdown table: header "a | b | c", rows lists of cells."""
    lines = [f"| {header} |", "|" + "---|" * (header.count("|") + 1)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def training_table(rows):
    header = ("variant | kernels | mode | step ms | tok/s | MFU | peak GiB | speed x"
              " | FLOP ceiling x | of ceiling | recompiles")
    return table(header, [
        [r["variant"], r["kernels"], r["mode"], f"{r['step_ms']:.1f}", f"{r['tok_s']:,.0f}",
         f"{r['mfu']:.1%}", cell(r["peak_mem_gib"], ".1f"), cell(r.get("speed_x"), ".2f"),
         cell(r.get("flop_ceiling_x"), ".2f"), cell(r.get("of_ceiling"), ".0%"),
         r["recompiles_timed"]]
        for r in rows])


def decode_table(rows):
    """Cached decode per model and batch, and its ratio to this repository's GPT-2 (baseline)."""
    base = {r["batch"]: r["tok_s"] for r in rows if r["model"] == "baseline" and "tok_s" in r}
    return table("decode (cached, greedy) | batch | tok/s | ms/token | vs baseline", [
        [r["model"], "-", r["error"], "-", "-"] if "error" in r else
        [r["model"], r["batch"], f"{r['tok_s']:,.0f}", f"{r['ms_per_token']:.2f}",
         cell(r["tok_s"] / base[r["batch"]] if r["batch"] in base else None, ".2f")]
        for r in rows])


def markdown(results):
    env, tests = results["environment"], results["tests"]
    counts = ", ".join(f"{n} {k}" for k, n in tests["counts"].items()) or "no result"
    failed = f"; failed: {', '.join(tests['failed'])}" if tests["failed"] else ""
    lines = [f"# GPU suite: {env['device']}, {env['date']}", "",
             f"torch {env['torch']}, Triton {env['triton']}, transformers {env['transformers']}, "
             f"CUDA {env['cuda']}. `{env['command']}`. "
             f"MFU against {env['peak_tflops']:.0f} TFLOP/s "
             "(dense bf16 peak). Untrained models, random tokens: only speed and size count.", "",
             f"tests/test_cuda.py: {counts}{failed}", ""]
    lines += training_table(results["training"]) + decode_table(results["decode"])
    lines += table("torch.compile graph breaks | kernels | graphs | breaks | where", [
        [r["variant"], r["kernels"], r["graphs"], r["graph_breaks"], r["reasons"] or "-"]
        for r in results["graph_breaks"]])
    lines += table("part | status | seconds", [
        [j["name"], j["status"], f"{j['seconds']:.0f}"] for j in results["jobs"]])
    return "\n".join(lines)


def report(cfg, out, jobs, begun):
    def rows_of(name):
        job = next((j for j in jobs if j.name == name and j.out and j.out.exists()), None)
        return json.loads(job.out.read_text())["rows"] if job else []

    results = {"environment": environment(cfg), "config": asdict(cfg),
               "wall_s": time.time() - begun,
               "tests": test_results(out / "logs" / f"{slug(TESTS)}.log"),
               "training": training_rows(jobs), "decode": rows_of("decode"),
               "graph_breaks": rows_of("graph breaks"),
               "jobs": [{"name": j.name, "status": j.status, "seconds": j.seconds,
                         "estimate_s": j.estimate_s}
                        for j in jobs]}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_csv(out / "training.csv", results["training"])
    write_csv(out / "decode.csv", results["decode"])
    write_csv(out / "graph_breaks.csv", results["graph_breaks"])
    (out / "summary.md").write_text(markdown(results))
    return results


def main(argv):
    begun = time.time()
    cfg, names = parse_args(argv)
    out = Path(cfg.out_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    end = begun + cfg.budget_s - 10  # ten seconds kept for writing the results
    checks, measurements = plan(cfg, names, out)
    print_plan(cfg, checks, measurements)
    # the CUDA tests need Triton's real compiler (tests/conftest.py would turn the interpreter on)
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONUNBUFFERED": "1"}
    if importlib.util.find_spec("pytest") is None and VENDOR.is_dir():  # no pytest on the machine
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(VENDOR)]))
    print("# phase 1: checks, side by side")
    run_side_by_side(checks, out, env, deadline=begun + 0.5 * cfg.budget_s)
    warmed = {j.name.replace("warm ", "train ", 1) for j in checks if j.status == "passed"}
    for job in measurements:
        if job.name.startswith("train compiled") and job.name not in warmed:
            job.status = "skipped: its first compile did not finish in phase 1"
    print("# phase 2: measurements, one at a time")
    run_one_at_a_time([j for j in measurements if j.status == "planned"], out, env, end)
    results = report(cfg, out, checks + measurements, begun)
    print(markdown(results))
    print(f"# {time.time() - begun:.0f} s; results in {out}/ "
          "(summary.md, results.json, *.csv, logs/)")
    jobs = checks + measurements
    finished = all(j.status == "passed" or j.status.startswith("skipped") for j in jobs)
    return 0 if finished and not results["tests"]["failed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
