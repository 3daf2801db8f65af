"""train.py: flags, data, checkpoints, exact resume, DDP, and the errors a user can act on."""

import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train

REPO = Path(__file__).resolve().parent.parent


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


def tiny_flags(dataset, out_dir, **overrides):
    flags = dict(dataset=dataset, out_dir=out_dir, n_layer=2, n_head=2, n_embd=32, block_size=16,
                 batch_size=4, max_iters=12, lr_decay_iters=12, warmup_iters=2, eval_interval=6,
                 eval_iters=2, log_interval=1, device="cpu", dropout=0.1)
    flags.update(overrides)
    return [f"--{k}={v}" for k, v in flags.items()]


def logged_losses(text):
    return {int(i): float(v) for i, v in re.findall(r"iter (\d+): loss ([0-9.]+)", text)}


def test_resuming_a_stopped_run_gives_the_losses_of_an_uninterrupted_one(dataset, tmp_path, capsys):
    train.main(tiny_flags(dataset, tmp_path / "full"))
    full = logged_losses(capsys.readouterr().out)
    train.main(tiny_flags(dataset, tmp_path / "split", max_iters=6))
    capsys.readouterr()
    train.main(tiny_flags(dataset, tmp_path / "split", init_from="resume"))
    resumed = logged_losses(capsys.readouterr().out)
    assert sorted(resumed) == list(range(6, 12))
    assert all(resumed[i] == full[i] for i in resumed)  # dropout on: RNG state restored too


def test_checkpoint_loads_with_weights_only_and_rebuilds_the_model(dataset, tmp_path):
    train.main(tiny_flags(dataset, tmp_path / "o", max_iters=3))
    ckpt = torch.load(tmp_path / "o" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["iter_num"] == 3 and ckpt["variant"] == "baseline"
    model, _ = train.load_model(tmp_path / "o")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["model"].items())
    assert not list((tmp_path / "o").glob("*.tmp"))  # the temporary file was renamed away


def test_ddp_with_two_processes_equals_one_process_with_the_same_global_batch(dataset, tmp_path):
    common = tiny_flags(dataset, None, max_iters=4, dropout=0.0, gradient_accumulation_steps=2)
    common = [f for f in common if not f.startswith("--out_dir")]
    one = subprocess.run([sys.executable, "train.py", *common, f"--out_dir={tmp_path / 'one'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *common, f"--out_dir={tmp_path / 'two'}"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    a = torch.load(tmp_path / "one" / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "two" / "ckpt.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def run_error(argv):
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    return str(e.value)


def test_unknown_flag_lists_the_valid_ones():
    msg = run_error(["--n_layers=3"])
    assert "unknown flag --n_layers" in msg and "n_layer" in msg


def test_mistyped_flag_value_is_named():
    assert "--max_iters expects an integer" in run_error(["--max_iters", "many"])


def test_unknown_variant_is_rejected():
    assert "unknown --variant" in run_error(["--variant", "moe"])


def test_flag_without_value_is_rejected():
    assert "--max_iters needs a value" in run_error(["--max_iters"])


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
    msg = run_error(["--dataset", str(tmp_path / "nothing"), "--device", "cpu"])
    assert "not prepared" in msg and "prepare.py" in msg


def test_corrupt_checkpoint_gives_a_clear_error(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint")
    assert "not a readable nanodepth checkpoint" in run_error(["--init_from", "resume", "--out_dir", str(tmp_path)])


def test_resuming_another_variants_checkpoint_is_refused(dataset, tmp_path):
    train.main(tiny_flags(dataset, tmp_path, max_iters=1))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["variant"] = "mystery"
    torch.save(ckpt, tmp_path / "ckpt.pt")
    assert "unknown to this version" in run_error(tiny_flags(dataset, tmp_path, init_from="resume"))


def test_config_file_sets_flags_and_rejects_code(dataset, tmp_path):
    good = tmp_path / "good.py"
    good.write_text('"""a config"""\nn_layer = 1\nmax_iters = 0\n')
    cfg, _ = train.parse_args([str(good), "--n_head=1"])
    assert (cfg.n_layer, cfg.max_iters, cfg.n_head) == (1, 0, 1)
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n")
    assert "only `key = value` lines" in run_error([str(bad)])


def test_nan_loss_stops_the_run_with_a_message(dataset, tmp_path):
    msg = run_error(tiny_flags(dataset, tmp_path, learning_rate=float("inf"), max_iters=3, warmup_iters=0))
    assert "loss became" in msg


def test_a_trained_model_keeps_its_context_unless_block_size_is_given(dataset, tmp_path):
    train.main(tiny_flags(dataset, tmp_path / "base", max_iters=1))  # context 16
    flags = [f for f in tiny_flags(dataset, tmp_path / "cont", max_iters=1, init_from=tmp_path / "base")
             if not f.startswith("--block_size")]
    train.main(flags)
    assert train.load_model(tmp_path / "cont")[0].config.block_size == 16
    train.main(flags + ["--block_size=8", f"--out_dir={tmp_path / 'short'}"])
    assert train.load_model(tmp_path / "short")[0].config.block_size == 8
    with pytest.raises(SystemExit, match="longer than the 16 tokens"):
        train.main(flags + ["--block_size=32"])
