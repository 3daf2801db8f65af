"""experiments/: each script's smoke preset runs train.py end to end and writes its CSV and PNG."""

import csv
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "experiments"))

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def dataset(tmp_path):
    """A tiny character dataset: random tokens from a 16-symbol vocabulary."""
    folder = tmp_path / "chars"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 4000), ("val", 600)):
        rng.integers(0, 16, n).astype(np.uint16).tofile(folder / f"{split}.bin")
    chars = [chr(ord("a") + i) for i in range(16)]
    with open(folder / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 16, "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}, f)
    return str(folder)


def run_smoke(module, dataset, tmp_path):
    argv = ["--preset=smoke", f"--dataset={dataset}", f"--runs_dir={tmp_path / 'runs'}",
            f"--results_dir={tmp_path / 'results'}", f"--assets_dir={tmp_path / 'assets'}"]
    module.main(argv)
    with open(tmp_path / "results" / f"{module.NAME}.csv") as f:
        rows = list(csv.DictReader(f))
    assert (tmp_path / "assets" / f"{module.NAME}.png").read_bytes()[:8] == PNG_MAGIC
    return rows, argv


def test_isoflop_smoke_writes_one_row_per_run_and_a_png(dataset, tmp_path, capsys):
    import mod_isoflop
    rows, argv = run_smoke(mod_isoflop, dataset, tmp_path)
    assert len(rows) == 4 and {r["variant"] for r in rows} == {"baseline", "mod"}
    assert all(float(r["val_loss"]) > 0 and int(r["steps"]) > 0 for r in rows)
    mod_isoflop.main(argv)  # a second call finds every run finished and trains nothing
    assert capsys.readouterr().out.count("finished earlier, skipped") == 4
