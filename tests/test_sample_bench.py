"""sample.py and bench.py run end to end on tiny settings and reject bad input clearly."""

import base64
import csv
import json
import math
import re

import numpy as np
import pytest
import requests
import tiktoken
import torch

import bench
import checkpoint
from benchmarks.profiling import profile_shares
from benchmarks.timing import warn_if_noisy
import sample
import train
from conftest import tiny_flags
from mod import MoDConfig, MoDGPT
from mom import MoMConfig, MoMGPT
from model import GPT, GPTConfig
from test_train import user_error


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


def test_sample_shows_the_depth_mod_decoding_used_past_the_first_context_window(dataset, tmp_path, capsys):
    train.main(tiny_flags(dataset, tmp_path, variant="mod", capacity=0.5, max_iters=2))  # context 16
    capsys.readouterr()
    sample.main([f"--out_dir={tmp_path}", "--start=ab", "--num_samples=1", "--max_new_tokens=30",
                 "--show_depth=True", "--device=cpu"])
    text, bars = capsys.readouterr().out.splitlines()[:2]
    model, _ = checkpoint.load_model(str(tmp_path))
    idx = torch.tensor([[ord(c) - ord("a") for c in text]])  # the dataset's characters are a, b, ...
    depth = model.eval().depth_per_token(idx, prompt_len=2)[0]
    assert len(text) == 32 and bars == "".join(sample.BARS[round(d * 8)] for d in depth[:-1].tolist()) + " "


@pytest.mark.parametrize("flags, named", [
    (["--temp=1"], "--temp"),
    (["--start=XYZ"], "--start"),
    (["--start=FILE:nowhere.txt"], "nowhere.txt"),
    (["--start="], "--start"),
    (["--device=cuda"], "--device"),
    (["--num_samples=many"], "--num_samples"),
    (["--init_from=RUN/garbage.pt"], "garbage.pt"),
    (["--init_from=RUN/garbage.safetensors"], "garbage.safetensors"),
    (["--temperature=nan"], "--temperature"),
    (["--temperature=inf"], "--temperature"),
    (["--temperature=-1"], "--temperature"),
    (["--seed=99999999999999999999"], "--seed"),
    (["--start=FILE:RUN"], "--start"),  # a folder
    (["--start=FILE:RUN/latin1.txt"], "latin1.txt"),
])
def test_sample_mistakes_end_in_one_line_naming_the_flag_or_file(dataset, tmp_path, capsys, flags, named):
    run = tmp_path / "run"
    train.main(tiny_flags(dataset, run, max_iters=1))
    (run / "garbage.pt").write_bytes(b"random bytes")
    (run / "garbage.safetensors").write_bytes(b"\x00" * 7)
    (run / "latin1.txt").write_bytes("café".encode("latin-1"))
    flags = [f.replace("RUN", str(run)) for f in flags]
    assert named in user_error(capsys, sample.main, [f"--out_dir={run}", "--device=cpu", *flags])


def test_sample_settings_refuse_a_temperature_that_is_not_a_finite_number():
    for bad in (math.nan, math.inf, -0.5):
        with pytest.raises(ValueError, match="--temperature"):
            sample.SampleConfig(temperature=bad)
    assert sample.SampleConfig(temperature=0).temperature == 0  # greedy


def test_an_mps_device_with_an_index_is_refused_in_one_line_where_mps_is_absent(capsys, monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert "--device mps:0" in user_error(capsys, checkpoint.pick_device, "mps:0")


def sample_text(capsys, run, *flags):
    capsys.readouterr()
    sample.main([f"--out_dir={run}", "--num_samples=1", "--max_new_tokens=5", "--device=cpu", *flags])
    return capsys.readouterr().out.split("---------------")[0].strip("\n")


def test_a_character_checkpoint_keeps_its_vocabulary_when_the_dataset_folder_changes(dataset, tmp_path, capsys):
    run, meta = tmp_path / "run", tmp_path / "chars" / "meta.json"
    train.main(tiny_flags(dataset, run, max_iters=2))
    assert torch.load(run / "ckpt.pt", weights_only=True)["itos"] == [chr(ord("a") + i) for i in range(16)]
    upper = [chr(ord("A") + i) for i in range(16)]  # prepared again from other text, same size
    meta.write_text(json.dumps({"vocab_size": 16, "itos": dict(enumerate(upper)),
                                "stoi": {c: i for i, c in enumerate(upper)}}))
    assert re.fullmatch("abc[a-p]{5}", sample_text(capsys, run, "--start=abc"))
    meta.unlink()  # not GPT-2's BPE either
    assert re.fullmatch("abc[a-p]{5}", sample_text(capsys, run, "--start=abc"))
    assert "'Z'" in user_error(capsys, sample.main, [f"--out_dir={run}", "--start=aZ", "--device=cpu"])


@pytest.mark.parametrize("chars", [20, 0])  # the folder prepared again from other text; meta.json gone
def test_an_older_checkpoint_whose_dataset_lost_its_vocabulary_is_refused_in_one_line(dataset, tmp_path, capsys,
                                                                                      chars):
    run, meta = tmp_path / "run", tmp_path / "chars" / "meta.json"
    train.main(tiny_flags(dataset, run, max_iters=1))
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    del ckpt["itos"]  # as checkpoints were written before they kept their characters
    checkpoint.save_checkpoint(run / "ckpt.pt", ckpt)
    assert re.fullmatch("abc[a-p]{5}", sample_text(capsys, run, "--start=abc"))  # meta.json still fits
    letters = [chr(ord("a") + i) for i in range(chars)]
    meta.write_text(json.dumps({"vocab_size": chars, "itos": dict(enumerate(letters)),
                                "stoi": {c: i for i, c in enumerate(letters)}}))
    if not chars:
        meta.unlink()
    err = user_error(capsys, sample.main, [f"--out_dir={run}", "--start=abc", "--device=cpu"])
    assert str(tmp_path / "chars") in err and "16 characters" in err


def write_ranks(path, ranks):
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % r for t, r in ranks.items()))
    return path


def test_gpt2_bpe_offline_says_how_to_pass_local_ranks_and_uses_them(tmp_path, capsys, monkeypatch):
    folder, run = tmp_path / "bpe", tmp_path / "run"  # a GPT-2 BPE dataset: no meta.json
    folder.mkdir()
    for split in ("train", "val"):
        np.random.default_rng(0).integers(0, 258, 600).astype(np.uint16).tofile(folder / f"{split}.bin")
    train.main(tiny_flags(str(folder), run, max_iters=1, n_embd=16))

    def offline(name):
        raise requests.exceptions.ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    err = user_error(capsys, sample.main, [f"--out_dir={run}", "--device=cpu"])
    assert "ConnectionError" in err and "--bpe_ranks=PATH" in err
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256}  # the bytes and one merge
    path = write_ranks(tmp_path / "tiny.tiktoken", ranks)
    encode, decode = sample.tokenizer(None, sample.gpt2_encoding(str(path)), 50304)
    assert encode("abab<|endoftext|>") == [256, 256, 257] and decode([256, 99, 257, 300]) == "abc<|endoftext|>\ufffd"
    text = sample_text(capsys, run, f"--bpe_ranks={path}", "--start=ab ab")
    assert text.startswith("ab ab")  # the model's padding ids (258 to 50303) decode as U+FFFD
    write_ranks(path, {b"ab": 0})
    assert "one-byte" in user_error(capsys, sample.main, [f"--out_dir={run}", f"--bpe_ranks={path}", "--device=cpu"])
    write_ranks(path, {bytes([b]): b for b in range(256)} | {b"ab": 7})  # rank 7 twice
    assert "each once" in user_error(capsys, sample.main, [f"--out_dir={run}", f"--bpe_ranks={path}", "--device=cpu"])
    path.write_text("not base64 at all\n")
    assert "line 1" in user_error(capsys, sample.main, [f"--out_dir={run}", f"--bpe_ranks={path}", "--device=cpu"])
    assert "nowhere" in user_error(capsys, sample.main, [f"--out_dir={run}", "--bpe_ranks=nowhere", "--device=cpu"])


def test_the_tokenizer_is_checked_before_gpt2_weights_download(capsys, monkeypatch):
    def offline(name):
        raise requests.exceptions.ConnectionError("no network")

    def download(*args, **kwargs):
        raise AssertionError("the weights were fetched before the tokenizer was checked")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.setattr(sample, "pretrained", download)
    assert "--bpe_ranks=PATH" in user_error(capsys, sample.main, ["--init_from=gpt2", "--device=cpu"])


def test_bpe_ranks_with_a_character_checkpoint_is_refused(dataset, tmp_path, capsys):
    train.main(tiny_flags(dataset, tmp_path, max_iters=1))
    err = user_error(capsys, sample.main, [f"--out_dir={tmp_path}", "--bpe_ranks=x.tiktoken",
                                           "--device=cpu"])
    assert "--bpe_ranks" in err and "character model" in err


TINY_BENCH = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--vocab_size=64", "--device=cpu"]


def test_bench_rows_hold_the_ratios_computed_from_their_own_measurements(tmp_path, capsys):
    path = tmp_path / "rows.csv"
    bench.main(TINY_BENCH + ["--batch_size=2", "--steps=1", "--warmup=0", "--repeats=2", "--variants=mod",
                             "--capacity=0.25", f"--csv={path}"])
    out = capsys.readouterr().out
    rows = {row["variant"]: {k: float(v) for k, v in row.items() if k != "variant"}
            for row in csv.DictReader(path.open())}
    assert list(rows) == ["baseline", "mod"] and "spread" in out
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64)
    mod_flops = MoDGPT(config, MoDConfig(capacity=0.25)).flops_per_token(32)
    assert rows["mod"]["flops_per_token"] == pytest.approx(mod_flops)
    assert rows["mod"]["flop_ceiling"] == pytest.approx(GPT(config).flops_per_token(32) / mod_flops)
    assert rows["mod"]["speed"] == pytest.approx(rows["mod"]["tok_s"] / rows["baseline"]["tok_s"])
    assert rows["mod"]["memory_ratio"] == pytest.approx(rows["mod"]["memory_bytes"] / rows["baseline"]["memory_bytes"])
    assert rows["mod"]["memory_ratio"] < 1  # 2 of 4 tokens' worth of activations skip the routed block
    mod_line = next(line for line in out.splitlines() if line.startswith("mod"))
    assert f"{rows['mod']['flop_ceiling']:.2f}x" in mod_line


def test_bench_counts_the_flops_of_the_routing_a_mom_step_took_not_its_no_skip_ceiling(tmp_path, capsys):
    path = tmp_path / "rows.csv"
    bench.main(TINY_BENCH + ["--batch_size=2", "--steps=1", "--warmup=0", "--repeats=1", "--variants=mom",
                             f"--csv={path}"])
    rows = {row["variant"]: {k: float(v) for k, v in row.items() if k != "variant"}
            for row in csv.DictReader(path.open())}
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64)
    no_skip = MoMGPT(config, MoMConfig()).flops_per_token(32)
    assert 0 < rows["mom"]["flops_per_token"] < no_skip  # untrained routers send some choices to SKIP
    base, mom = rows["baseline"]["flops_per_token"], rows["mom"]["flops_per_token"]
    assert rows["mom"]["flop_ceiling"] == pytest.approx(base / mom)


def test_bench_warns_when_the_rounds_spread_by_more_than_ten_percent(capsys):
    warn_if_noisy({"baseline": 0.02, "mod": 0.31})
    out = capsys.readouterr().out
    assert "machine is noisy" in out and "31%" in out and "(mod)" in out
    warn_if_noisy({"baseline": 0.02, "mod": 0.05})
    assert capsys.readouterr().out == ""


def test_bench_decodes_mod_at_four_capacities_with_routers_set_to_route_that_share(tmp_path, capsys):
    path = tmp_path / "decode.csv"
    bench.main(TINY_BENCH + ["--decode=True", "--max_new_tokens=12", "--repeats=1", "--variants=mod",
                             f"--csv={path}"])
    rows = {row["variant"]: row for row in csv.DictReader(path.open())}
    capacities = [0.125, 0.25, 0.5, 1.0]
    assert list(rows)[:5] == ["baseline"] + [f"mod C={c}" for c in capacities]
    kv = [int(rows[f"mod C={c}"]["kv_bytes"]) for c in capacities]
    assert kv == sorted(kv) and kv[0] < kv[-1] == int(rows["baseline"]["kv_bytes"])  # C = 1 caches every token


@pytest.mark.parametrize("causal_method", ["aux_loss", "predictor"])
def test_an_untrained_mod_is_calibrated_to_route_its_capacity_causally(causal_method):
    config = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64)
    settings = MoDConfig(capacity=0.25, causal_method=causal_method)
    model = MoDGPT(config, settings).calibrate_untrained(seed=0)
    with torch.no_grad(), model.routing("causal"):
        model(torch.randint(64, (8, 32), generator=torch.Generator().manual_seed(5)))
    assert model.routed_blocks()[1].routed_mask.float().mean().item() == pytest.approx(0.25, abs=0.1)


@pytest.mark.parametrize("flags, named", [
    (["--layers=2"], "--layers"),
    (["--prefill=True"], "--checkpoints"),
    (["--profile=True", "--compare_kernels=True"], "--profile"),
    (["--variants=moe"], "--variants"),
    (["--capacity=2"], "--capacity"),
    (["--checkpoints=nowhere"], "nowhere"),
    (["--device=cuda"], "--device"),
    (["--batch_size=0"], "--batch_size"),
    (["--dtype=float64"], "--dtype"),
])
def test_bench_mistakes_end_in_one_line_naming_the_flag(capsys, flags, named):
    assert named in user_error(capsys, bench.main, flags)


def test_bench_measures_trained_checkpoints_on_their_val_set(dataset, tmp_path, capsys):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    train.main(tiny_flags(dataset, base, max_iters=6, dropout=0.0))
    train.main(tiny_flags(dataset, tuned, variant="router_tuning", init_from=base, max_iters=6, skip_layers="0"))
    capsys.readouterr()
    bench.main([f"--checkpoints={base},{tuned}", "--prefill=True", "--repeats=1", "--device=cpu", "--profile=True"])
    table, profiles = capsys.readouterr().out.split("# where the CPU time goes")
    rows = [line.split() for line in table.splitlines() if line.startswith(str(tmp_path))]
    assert [r[1] for r in rows] == ["baseline", "router_tuning"] and rows[0][4] == "1.000x"
    assert "capacity" in rows[1]  # the tuned model reports how many gates opened
    profiled = [line.split()[0] for line in profiles.splitlines() if line.startswith(str(tmp_path))]
    assert profiled == [str(base), str(tuned)]  # --profile: one line of shares per checkpoint
    bench.main([f"--checkpoints={base},{tuned}", "--decode=True", "--max_new_tokens=20", "--prompt_len=4",
                "--device=cpu"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(str(tmp_path))]
    assert len(rows) == 2 and rows[0][-1] == "1.00x"


def test_profile_shares_put_each_op_under_its_kind():
    a, b, index = torch.randn(256, 256), torch.randn(256, 256), torch.randint(256, (4096,))
    matmul, _, calls = profile_shares(lambda: a @ b)
    gather, top, _ = profile_shares(lambda: a.index_select(0, index))
    assert matmul["matmul"] > 0.8 and gather["moving rows"] > 0.8 and "aten::index_select" in top
    assert sum(matmul.values()) == pytest.approx(1) and sum(gather.values()) == pytest.approx(1) and calls == 1


def test_profile_shares_count_adamw_as_the_optimizer():
    """On a CPU AdamW loops over the parameters with ordinary ops: they count as the optimizer's
    (exact shares here; the printed ones are rounded and may show 0% on a busy machine)."""
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    optimizer = torch.optim.AdamW(model.parameters())
    tokens = torch.zeros(1, 8, dtype=torch.long)

    def step():
        model(tokens, tokens)[1].backward()
        optimizer.step()

    shares, _, _ = profile_shares(step)
    assert shares["optimizer"] > 0.01 and shares["matmul"] > 0


def test_bench_profile_prints_one_line_of_shares_per_variant(capsys):
    bench.main(TINY_BENCH + ["--batch_size=2", "--steps=1", "--warmup=0", "--repeats=1", "--variants=mod",
                             "--profile=True"])
    out = capsys.readouterr().out.split("# where the CPU time goes")[1].splitlines()[1:]
    for line, name in zip(out, ["baseline", "mod"], strict=True):
        shares = dict(re.findall(r"(optimizer|matmul|attention|moving rows|other)\s+(\d+)%", line))
        assert line.startswith(name) and len(shares) == 5 and int(shares["matmul"]) > 0
        assert 97 <= sum(map(int, shares.values())) <= 103  # rounded shares of one whole
