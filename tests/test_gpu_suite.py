"""
gpu_suite.py's dry run on the CPU: every part of the GPU suite at tiny dims (the CUDA tests
skip themselves, torch.compile traces with its eager backend), so that the one run on a GPU
finds no broken code path; and the wall-clock budget: a run that cannot fit stops and still
writes what it has.
"""

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def suite(out_dir, *flags, timeout=300):
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "gpu_suite.py"),
            "--device=cpu",
            f"--out_dir={out_dir}",
            *flags,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_dry_run_measures_every_variant_and_writes_every_table(tmp_path):
    done = suite(tmp_path, "--compiled=mod:triton")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "estimate" in done.stdout.splitlines()[0]  # the plan comes first
    results = json.loads((tmp_path / "results.json").read_text())
    variants = {"baseline", "mod", "mom", "router_tuning"}
    eager = {(r["variant"], r["kernels"]) for r in results["training"] if r["mode"] == "eager"}
    assert eager == {(v, "torch") for v in variants} | {("mod", "triton")}
    compiled = [r for r in results["training"] if r["mode"] == "compiled"]
    assert [(r["variant"], r["kernels"]) for r in compiled] == [("mod", "triton")]
    assert all(r["tok_s"] > 0 and r["flops_per_token"] > 0 for r in results["training"])
    decoded = {(r["model"], r["batch"]) for r in results["decode"] if "error" not in r}
    assert {(v, b) for v in variants for b in (1, 2)} <= decoded
    assert "transformers GPT-2" in {
        r["model"] for r in results["decode"]
    }  # a row, or why there is none
    breaks = {(r["variant"], r["kernels"]): r["graph_breaks"] for r in results["graph_breaks"]}
    # GPT-2, MoD (with or without its kernels) and router-tuning trace into one graph each
    assert (
        breaks[("baseline", "torch")] == breaks[("mod", "torch")] == breaks[("mod", "triton")] == 0
    )
    assert breaks[("router_tuning", "torch")] == 0
    assert results["environment"]["torch"] and results["tests"]["counts"].get("skipped") == 1
    for name in ("training.csv", "decode.csv", "graph_breaks.csv"):
        with open(tmp_path / name) as f:
            assert len(list(csv.DictReader(f))) >= 5, name
    summary = (tmp_path / "summary.md").read_text()
    assert "| mod | triton | compiled |" in summary and "MFU against 989 TFLOP/s" in summary


def test_a_run_that_cannot_fit_its_budget_stops_and_still_writes_its_results(tmp_path):
    t0 = time.time()
    done = suite(tmp_path, "--budget_s=12")
    assert time.time() - t0 < 12 + 15  # the budget, plus starting Python and writing the results
    results = json.loads((tmp_path / "results.json").read_text())
    statuses = [job["status"] for job in results["jobs"]]
    assert any(s == "timed out" or s.startswith("skipped") for s in statuses)
    assert done.returncode == (
        1 if "timed out" in statuses else 0
    )  # a part that overran fails the run


def test_a_bad_flag_is_one_line_and_exit_code_2(tmp_path):
    done = suite(tmp_path / "out", "--device=tpu", timeout=60)
    assert (
        done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "--device" in done.stderr
    )
    assert not (tmp_path / "out").exists()


def test_help_lists_every_flag_with_its_default():
    done = subprocess.run([sys.executable, str(ROOT / "gpu_suite.py"), "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    for flag in ("--out_dir=gpu_results", "--budget_s=420.0", "--compiled=", "--variants=all"):
        assert flag in done.stdout, flag


@pytest.mark.parametrize("flag, named", [("--compiled=mod:foo", "'foo'"),
                                         ("--compiled=mom:triton", "mom")])
def test_compiled_cases_are_checked_before_anything_runs(tmp_path, flag, named):
    done = suite(tmp_path / "out", flag, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "--compiled" in done.stderr and named in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["afile", "afile/sub"])
def test_an_out_dir_that_is_a_file_is_one_line(tmp_path, out):
    (tmp_path / "afile").write_text("mine")
    done = suite(tmp_path / out, timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "--out_dir" in done.stderr and (tmp_path / "afile").read_text() == "mine"
