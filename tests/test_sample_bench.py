"""sample.py and bench.py run end to end on tiny settings and reject bad input clearly."""

import pytest

import bench
import sample
import train
from test_train import dataset, tiny_flags  # noqa: F401  (fixture)


def test_sample_continues_the_prompt_from_a_checkpoint(dataset, tmp_path, capsys):
    train.main(tiny_flags(dataset, tmp_path, max_iters=2))
    capsys.readouterr()
    sample.main([f"--out_dir={tmp_path}", "--start=abc", "--num_samples=2", "--max_new_tokens=5", "--device=cpu"])
    texts = [t.strip("\n") for t in capsys.readouterr().out.split("---------------") if t.strip()]
    assert len(texts) == 2 and all(t.startswith("abc") and len(t) == 8 for t in texts)


def test_sample_shows_depth_and_cache_size(dataset, tmp_path, capsys):
    train.main(tiny_flags(dataset, tmp_path, max_iters=1))
    capsys.readouterr()
    sample.main([f"--out_dir={tmp_path}", "--start=ab", "--num_samples=1", "--max_new_tokens=4",
                 "--show_depth=True", "--device=cpu"])
    out = capsys.readouterr().out
    assert "mean depth per generated token: 1.000" in out and "(1.00x)" in out
    assert "\n" + "█" * 6 + "\n" in out  # not a terminal: a full-height bar under each of the 6 characters


def test_sample_rejects_unknown_flags_and_characters(dataset, tmp_path):
    with pytest.raises(SystemExit, match="unknown flag --temp"):
        sample.main(["--temp=1"])
    train.main(tiny_flags(dataset, tmp_path, max_iters=1))
    with pytest.raises(SystemExit, match="never saw"):
        sample.main([f"--out_dir={tmp_path}", "--start=XYZ", "--device=cpu"])


def test_bench_prints_a_row_per_variant_with_ratios_to_the_baseline(capsys):
    bench.main(["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--vocab_size=64",
                "--batch_size=2", "--steps=1", "--warmup=0", "--variants=baseline", "--device=cpu"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("baseline")]
    assert len(rows) == 1 and "1.00x" in rows[0]


def test_bench_rejects_unknown_flags():
    with pytest.raises(SystemExit, match="unknown flag --layers"):
        bench.main(["--layers=2"])


def test_bench_measures_trained_checkpoints_on_their_val_set(dataset, tmp_path, capsys):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    train.main(tiny_flags(dataset, base, max_iters=6, dropout=0.0))
    train.main(tiny_flags(dataset, tuned, variant="router_tuning", init_from=base, max_iters=6, skip_layers="0"))
    capsys.readouterr()
    bench.main([f"--checkpoints={base},{tuned}", "--prefill=True", "--repeats=1", "--device=cpu"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(str(tmp_path))]
    assert [r[1] for r in rows] == ["baseline", "router_tuning"] and rows[0][4] == "1.000x"
    assert "capacity" in rows[1]  # the tuned model reports how many gates opened
    bench.main([f"--checkpoints={base},{tuned}", "--decode=True", "--max_new_tokens=20", "--prompt_len=4",
                "--device=cpu"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(str(tmp_path))]
    assert len(rows) == 2 and rows[0][-1] == "1.00x"


def test_bench_prefill_needs_checkpoints():
    with pytest.raises(SystemExit, match="--checkpoints"):
        bench.main(["--prefill=True"])
