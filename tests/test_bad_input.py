"""
Bad input to bench.py and course/make.py ends in one line on stderr that names the flag, exit
code 2 and nothing written, before any measuring: settings the model's size cannot hold, a CSV
path that cannot be written, an output folder that is a file.
"""

import subprocess
import sys
from pathlib import Path

import pytest

import bench

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "course"))
import make  # noqa: E402

# dims small enough that a run which should have stopped at once ends in seconds anyway
TINY = ["--n_layer=2", "--n_head=2", "--n_embd=16", "--block_size=8", "--vocab_size=64",
        "--batch_size=1", "--steps=1", "--warmup=0", "--repeats=1", "--device=cpu"]


def refused(argv, capsys):
    """bench.py's stderr line for argv, which must end it with exit code 2 before measuring."""
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv + TINY)
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    assert "tok/s" not in out  # nothing was measured
    return err


@pytest.mark.parametrize("flags, named", [
    (["--variants=mod", "--route_every=100"], "--route_every"),
    (["--variants=mom", "--modules_per_step=99"], "--modules_per_step"),
    (["--variants=router_tuning", "--skip_layers=9"], "--skip_layers"),
    (["--variants=mod", "--route_every=100", "--decode=True"], "--route_every"),
    (["--variants=mod", "--route_every=100", "--compare_kernels=True"], "--route_every"),
], ids=["mod", "mom", "router_tuning", "decode", "compare_kernels"])
def test_bench_settings_the_model_cannot_hold_are_one_line(capsys, flags, named):
    assert named in refused(flags, capsys)


@pytest.mark.parametrize("csv_path, why", [("afile/x.csv", "afile is not a folder"),
                                           ("missing/x.csv", "missing is not a folder"),
                                           (".", "is a folder")])
def test_bench_csv_that_cannot_be_written_is_refused_before_measuring(tmp_path, capsys, csv_path,
                                                                      why):
    (tmp_path / "afile").write_text("mine")
    err = refused(["--variants=baseline", f"--csv={tmp_path / csv_path}"], capsys)
    assert "--csv" in err and why in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_bench_as_a_command_has_no_traceback(tmp_path):
    done = subprocess.run([sys.executable, "bench.py", "--variants=mod", "--route_every=100",
                           *TINY], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "--route_every 100" in done.stderr


@pytest.mark.parametrize("args", [["kv_cache_attention", "--out"], ["--handout"]],
                         ids=["--out", "--handout"])
@pytest.mark.parametrize("under", [False, True], ids=["a file", "under a file"])
def test_course_make_out_that_is_a_file_is_one_line(tmp_path, capsys, args, under):
    (tmp_path / "afile").write_text("mine")
    out = tmp_path / "afile" / "sub" if under else tmp_path / "afile"
    assert make.main(args + [str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "choose a new folder" in err and str(out) in err
    assert (tmp_path / "afile").read_text() == "mine"


def test_a_bench_seed_torch_cannot_take_is_one_line(capsys):
    assert "--seed" in refused(["--seed=18446744073709551616"], capsys)
