"""train.py: flags, data, checkpoints, exact resume, DDP, and the errors a user can act on."""

import json
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import train
from conftest import tiny_flags
from model import GPT
from variants import VARIANTS

REPO = Path(__file__).resolve().parent.parent


def logged_losses(text):
    return {int(i): float(v) for i, v in re.findall(r"iter (\d+): loss ([0-9.]+)", text)}


def logged_iters(out_dir):
    return [json.loads(line)["iter"] for line in (Path(out_dir) / "log.jsonl").read_text().splitlines()]


def user_error(capsys, main, argv):
    """Run main(argv) expecting a user error: exit code 2 and one line on stderr. Returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# --- resume ----------------------------------------------------------------------------------

def test_resuming_a_stopped_run_gives_the_losses_of_an_uninterrupted_one(dataset, tmp_path, capsys):
    train.main(tiny_flags(dataset, tmp_path / "full"))
    full = logged_losses(capsys.readouterr().out)
    train.main(tiny_flags(dataset, tmp_path / "split", max_iters=6))
    capsys.readouterr()
    train.main(tiny_flags(dataset, tmp_path / "split", init_from="resume"))
    resumed = logged_losses(capsys.readouterr().out)
    assert sorted(resumed) == list(range(6, 12))
    assert all(resumed[i] == full[i] for i in resumed)  # dropout on: RNG state restored too


def test_resume_with_only_out_dir_restores_every_stored_setting(dataset, tmp_path, capsys):
    """A MoD run at capacity 0.5, batch 6, lr 3e-3 continues as itself, not with today's defaults."""
    run = dict(variant="mod", capacity=0.5, route_every=1, batch_size=6, learning_rate=3e-3)
    train.main(tiny_flags(dataset, tmp_path / "full", **run))
    full = logged_losses(capsys.readouterr().out)
    train.main(tiny_flags(dataset, tmp_path / "split", max_iters=6, **run))
    capsys.readouterr()
    train.main(["--init_from=resume", f"--out_dir={tmp_path / 'split'}", "--max_iters=12"])
    out = capsys.readouterr().out
    resumed = logged_losses(out)
    assert "resume: --max_iters 6 -> 12" in out
    assert sorted(resumed) == list(range(6, 12)) and all(resumed[i] == full[i] for i in resumed)
    ckpt = torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)
    assert ckpt["variant_args"]["capacity"] == 0.5 and ckpt["config"]["batch_size"] == 6
    assert ckpt["config"]["learning_rate"] == 3e-3


@pytest.mark.parametrize("flag", ["--learning_rate=0.01", "--capacity=0.25", "--batch_size=12", "--block_size=8",
                                  "--variant=baseline"])
def test_resume_refuses_a_flag_that_would_change_the_run(dataset, tmp_path, capsys, flag):
    train.main(tiny_flags(dataset, tmp_path, max_iters=2, variant="mod", capacity=0.5, batch_size=6))
    before = (tmp_path / "ckpt.pt").read_bytes()
    err = user_error(capsys, train.main, ["--init_from=resume", f"--out_dir={tmp_path}", "--variant=mod", flag]
                     if "variant" not in flag else ["--init_from=resume", f"--out_dir={tmp_path}", flag])
    assert flag.split("=")[0].removeprefix("--") in err
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_eval_only_evaluates_and_writes_nothing(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    train.main(tiny_flags(dataset, run, max_iters=6))
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    train.main(["--init_from=resume", f"--out_dir={run}", "--eval_only=True"])
    out = capsys.readouterr().out
    assert "step 6: train loss" in out and "iter " not in out  # evaluated the checkpoint, trained nothing
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files


def test_resume_cleans_a_stale_temporary_file_and_drops_log_lines_past_the_checkpoint(dataset, tmp_path):
    train.main(tiny_flags(dataset, tmp_path, max_iters=6))
    (tmp_path / "ckpt.pt.tmp").write_bytes(b"half a checkpoint from a killed save")
    with open(tmp_path / "log.jsonl", "a") as f:  # a process killed after logging iter 9, before saving it
        f.write(json.dumps({"iter": 9, "train_seconds": 1.0, "train": {}, "val": {}}) + "\n")
    train.main(tiny_flags(dataset, tmp_path, init_from="resume"))
    assert not (tmp_path / "ckpt.pt.tmp").exists()
    assert logged_iters(tmp_path) == [0, 6, 12]


def test_ctrl_c_finishes_the_iteration_saves_and_resumes_exactly(dataset, tmp_path, capsys, monkeypatch):
    train.main(tiny_flags(dataset, tmp_path / "full"))
    full = logged_losses(capsys.readouterr().out)
    lr = train.learning_rate

    def interrupt_at_3(cfg, it):
        if it == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return lr(cfg, it)

    monkeypatch.setattr(train, "learning_rate", interrupt_at_3)
    with pytest.raises(SystemExit) as e:
        train.main(tiny_flags(dataset, tmp_path / "split"))
    assert e.value.code == 130
    assert torch.load(tmp_path / "split" / "ckpt.pt", weights_only=True)["iter_num"] == 4
    monkeypatch.setattr(train, "learning_rate", lr)
    capsys.readouterr()
    train.main(tiny_flags(dataset, tmp_path / "split", init_from="resume"))
    resumed = logged_losses(capsys.readouterr().out)
    assert sorted(resumed) == list(range(4, 12)) and all(resumed[i] == full[i] for i in resumed)


def test_a_second_ctrl_c_during_the_save_does_not_cut_it(dataset, tmp_path, monkeypatch):
    save = checkpoint.save_checkpoint

    def save_interrupted(path, payload):
        os.kill(os.getpid(), signal.SIGINT)  # arrives while the file is written
        save(path, payload)

    monkeypatch.setattr(train, "save_checkpoint", save_interrupted)
    with pytest.raises(SystemExit) as e:
        train.main(tiny_flags(dataset, tmp_path, max_iters=6))
    assert e.value.code == 130  # the first Ctrl-C asked to stop; the save finished
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 6
    assert not (tmp_path / "ckpt.pt.tmp").exists()


# --- checkpoints and output folders -------------------------------------------------------------

def test_checkpoint_loads_with_weights_only_and_rebuilds_the_model(dataset, tmp_path):
    train.main(tiny_flags(dataset, tmp_path / "o", max_iters=3))
    ckpt = torch.load(tmp_path / "o" / "ckpt.pt", map_location="cpu", weights_only=True)
    assert ckpt["iter_num"] == 3 and ckpt["variant"] == "baseline"
    model, _ = checkpoint.load_model(tmp_path / "o")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ckpt["model"].items())


def test_each_variant_has_its_own_default_out_dir():
    out_dirs = {v: train.parse_args([f"--variant={v}"])[0].out_dir for v in VARIANTS}
    assert out_dirs == {v: "out" if cls is GPT else f"out-{v}" for v, (cls, _) in VARIANTS.items()}
    assert out_dirs["baseline"] == "out" and out_dirs["mod"] == "out-mod"


def test_a_new_run_refuses_a_folder_holding_a_checkpoint_unless_told_to_overwrite(dataset, tmp_path, capsys):
    train.main(tiny_flags(dataset, tmp_path, max_iters=6))
    before = (tmp_path / "ckpt.pt").read_bytes()
    err = user_error(capsys, train.main, tiny_flags(dataset, tmp_path, max_iters=2, variant="mod"))
    assert str(tmp_path) in err and "--out_dir" in err and "--init_from=resume" in err
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    train.main(tiny_flags(dataset, tmp_path, max_iters=2, variant="mod", overwrite=True))
    assert logged_iters(tmp_path) == [0, 2]  # a fresh log, not the old run's lines too


def test_a_non_finite_model_is_never_saved_and_the_message_is_true(dataset, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(tiny_flags(dataset, tmp_path, learning_rate=1e30, max_iters=3, warmup_iters=0,
                              eval_interval=1))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "loss became" in err and "no checkpoint was saved" in err
    assert not (tmp_path / "ckpt.pt").exists()


def test_a_crafted_meta_pickle_cannot_run_code(dataset, tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = Path(dataset)
    (folder / "meta.json").unlink()
    (folder / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 16, "itos": Exploit()}))
    err = user_error(capsys, checkpoint.read_meta, folder)
    assert "meta" in err and not marker.exists()
    plain = {"vocab_size": 2, "itos": {0: "a", 1: "b"}, "stoi": {"a": 0, "b": 1}}
    (folder / "meta.pkl").write_bytes(pickle.dumps(plain))  # an old, honest meta.pkl still reads
    assert checkpoint.read_meta(folder) == plain


def test_gpt2_weights_from_a_safetensors_file_or_folder_start_a_run(dataset, tmp_path, capsys):
    from test_gpt2_weights import tiny_hf_gpt2, write_checkpoint
    folder = write_checkpoint(tmp_path / "gpt2", tiny_hf_gpt2())
    for source in (folder, folder / "model.safetensors"):
        out = tmp_path / f"from-{source.name}"
        train.main(tiny_flags(dataset, out, max_iters=1, block_size=8, init_from=source, n_layer=None,
                              n_head=None, n_embd=None))
        assert checkpoint.load_model(out)[0].config.n_embd == 32
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 64)
    err = user_error(capsys, train.main, tiny_flags(dataset, tmp_path / "x", init_from=tmp_path / "bad.safetensors"))
    assert "bad.safetensors" in err and not (tmp_path / "x").exists()


def test_a_trained_model_keeps_its_context_unless_block_size_is_given(dataset, tmp_path, capsys):
    train.main(tiny_flags(dataset, tmp_path / "base", max_iters=1))  # context 16
    flags = [f for f in tiny_flags(dataset, tmp_path / "cont", max_iters=1, init_from=tmp_path / "base")
             if not f.startswith("--block_size")]
    train.main(flags)
    assert checkpoint.load_model(tmp_path / "cont")[0].config.block_size == 16
    train.main(flags + ["--block_size=8", f"--out_dir={tmp_path / 'short'}"])
    assert checkpoint.load_model(tmp_path / "short")[0].config.block_size == 8
    assert "longer than the 16 tokens" in user_error(capsys, train.main, flags + ["--block_size=32",
                                                                                  f"--out_dir={tmp_path / 'long'}"])


def test_config_file_sets_flags(tmp_path):
    good = tmp_path / "good.py"
    good.write_text('"""a config"""\nn_layer = 1\nmax_iters = 0\n')
    cfg, _, given = train.parse_args([str(good), "--n_head=1"])
    assert (cfg.n_layer, cfg.max_iters, cfg.n_head) == (1, 0, 1) and given == {"n_layer", "max_iters", "n_head"}


def test_router_tuning_defaults_to_the_papers_recipe_and_flags_still_win():
    """One epoch over its 1,000 tuning windows, 3% warmup, cosine decay to 0."""
    cfg, _, _ = train.parse_args(["--variant=router_tuning", "--init_from=base"])
    assert (cfg.train_samples, cfg.max_iters, cfg.lr_decay_iters) == (1000, 84, 84)  # 1000 / 12
    assert (cfg.warmup_iters, cfg.min_lr) == (3, 0.0)
    cfg, _, _ = train.parse_args(["--variant=router_tuning", "--batch_size=25",
                                  "--gradient_accumulation_steps=2", "--train_samples=400"])
    assert (cfg.max_iters, cfg.lr_decay_iters, cfg.warmup_iters) == (8, 8, 1)
    cfg, _, _ = train.parse_args(["--variant=router_tuning", "--max_iters=5", "--min_lr=1e-4"])
    assert (cfg.max_iters, cfg.min_lr, cfg.lr_decay_iters) == (5, 1e-4, 84)
    cfg, _, _ = train.parse_args(["--variant=mod"])
    assert (cfg.max_iters, cfg.min_lr, cfg.train_samples) == (2000, 1e-4, 0)  # train.py's own


def test_router_tuning_prints_its_defaults_and_runs_one_epoch(dataset, tmp_path, capsys):
    train.main(tiny_flags(dataset, tmp_path / "base", max_iters=2))
    capsys.readouterr()
    flags = tiny_flags(dataset, tmp_path / "tuned", variant="router_tuning",
                       init_from=tmp_path / "base", train_samples=40)
    flags = [f for f in flags if not f.startswith(("--max_iters", "--lr_decay_iters"))]
    train.main(flags)
    out = capsys.readouterr().out
    assert "--variant router_tuning sets its own defaults" in out
    assert "--max_iters=10" in out  # 40 windows / batch 4
    assert torch.load(tmp_path / "tuned" / "ckpt.pt", weights_only=True)["iter_num"] == 10


def test_router_tuning_trains_one_epoch_over_its_samples_without_replacement(dataset):
    batches = train.Batches(dataset, 16, 4, "cpu", seed=0, samples=10)
    epoch = torch.cat([batches.offsets("train", 4) for _ in range(2)] + [batches.offsets("train", 2)])
    assert sorted(epoch.tolist()) == [16 * i for i in range(10)]  # each of the 10 windows once


def test_resume_mid_epoch_draws_the_batches_of_an_uninterrupted_run(dataset, tmp_path, capsys):
    epochs = dict(train_samples=10)  # 4 windows a step: iter 6 stops 2.4 epochs in
    train.main(tiny_flags(dataset, tmp_path / "full", **epochs))
    full = logged_losses(capsys.readouterr().out)
    train.main(tiny_flags(dataset, tmp_path / "split", max_iters=6, **epochs))
    capsys.readouterr()
    train.main(tiny_flags(dataset, tmp_path / "split", init_from="resume", **epochs))
    resumed = logged_losses(capsys.readouterr().out)
    assert sorted(resumed) == list(range(6, 12)) and all(resumed[i] == full[i] for i in resumed)


# --- DDP -------------------------------------------------------------------------------------

def run_ddp(argv, out_dir, processes):
    launcher = [sys.executable, "train.py"] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", "train.py"]
    done = subprocess.run([*launcher, *argv, f"--out_dir={out_dir}"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-8000:]
    return torch.load(Path(out_dir) / "ckpt.pt", weights_only=True)["model"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_ddp_with_two_processes_equals_one_process_with_the_same_global_batch(dataset, tmp_path, variant):
    common = tiny_flags(dataset, None, max_iters=3, dropout=0.0, gradient_accumulation_steps=2, variant=variant,
                        eval_interval=3)
    common = [f for f in common if not f.startswith("--out_dir")]
    if VARIANTS[variant][0].starts_from_dense:  # tuned on a trained dense model
        train.main(tiny_flags(dataset, tmp_path / "base", max_iters=2, n_layer=4, dropout=0.0))
        common = [f for f in common if not f.startswith(("--n_layer", "--n_head", "--n_embd", "--block_size"))]
        common += [f"--init_from={tmp_path / 'base'}", "--learning_rate=0.05"]
    a, b = run_ddp(common, tmp_path / "one", 1), run_ddp(common, tmp_path / "two", 2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_accumulation_steps_not_divisible_by_the_processes_is_one_line(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    err = user_error(capsys, train.main, tiny_flags(dataset, tmp_path, gradient_accumulation_steps=3))
    assert "--gradient_accumulation_steps 3" in err


# --- every bad input: one line naming it, exit code 2, nothing written -------------------------

def bad_dataset(tmp_path, dataset, kind):
    folder = Path(dataset)
    if kind == "empty":
        (folder / "train.bin").write_bytes(b"")
    elif kind == "odd":
        (folder / "train.bin").write_bytes(b"\x01\x00\x02")
    elif kind == "short":
        np.arange(10, dtype=np.uint16).tofile(folder / "train.bin")
    elif kind == "vocab":
        np.full(100, 40, dtype=np.uint16).tofile(folder / "val.bin")
    return str(folder)


TRAIN_MISTAKES = [  # (flags, text the line must hold)
    (["--n_layers=3"], "--n_layers"),
    (["--max_iters", "many"], "--max_iters"),
    (["--variant", "moe"], "--variant"),
    (["--max_iters"], "--max_iters"),
    (["--n_head=3"], "--n_head"),
    (["--learning_rate=0"], "--learning_rate"),
    (["--learning_rate=-1e-3"], "--learning_rate"),
    (["--eval_interval=0"], "--eval_interval"),
    (["--batch_size=0"], "--batch_size"),
    (["--dtype=float64"], "--dtype"),
    (["--device=cuda"], "--device"),
    (["--variant=mod", "--capacity=2"], "--capacity"),
    (["--variant=mod", "--route_every=9"], "--route_every"),
    (["--variant=mom", "--n_attn_modules=2", "--modules_per_step=4"], "--modules_per_step"),
    (["--dataset=nosuchdata"], "nosuchdata"),
    (["--init_from=resume"], "ckpt.pt"),
]


@pytest.mark.parametrize("flags, named", TRAIN_MISTAKES)
def test_train_mistakes_end_in_one_line_naming_the_flag(dataset, tmp_path, capsys, flags, named):
    out = tmp_path / "out"
    argv = [f"--dataset={dataset}", "--device=cpu", "--max_iters=1", f"--out_dir={out}", *flags]
    assert named in user_error(capsys, train.main, argv)
    assert not out.exists()


@pytest.mark.parametrize("kind, named", [("empty", "train.bin"), ("odd", "train.bin"), ("short", "train.bin"),
                                         ("vocab", "val.bin")])
def test_bad_token_files_end_in_one_line_naming_the_file(dataset, tmp_path, capsys, kind, named):
    argv = tiny_flags(bad_dataset(tmp_path, dataset, kind), tmp_path / "out")
    assert named in user_error(capsys, train.main, argv)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"random bytes, not a checkpoint", "truncated"])
def test_a_broken_checkpoint_is_one_line_without_pytorch_advice(dataset, tmp_path, capsys, content):
    train.main(tiny_flags(dataset, tmp_path / "good", max_iters=1))
    good = (tmp_path / "good" / "ckpt.pt").read_bytes()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "ckpt.pt").write_bytes(good[: len(good) // 2] if content == "truncated" else content)
    err = user_error(capsys, train.main, ["--init_from=resume", f"--out_dir={tmp_path / 'bad'}"])
    assert "ckpt.pt" in err and "weights_only" not in err
    assert os.listdir(tmp_path / "bad") == ["ckpt.pt"]


def test_stage_two_pools_the_checkpoint_cannot_fill_and_gated_layers_it_lacks_are_one_line(dataset, tmp_path, capsys):
    train.main(tiny_flags(dataset, tmp_path / "base", max_iters=1))  # 2 layers
    for flags, named in ((["--variant=mom", "--n_attn_modules=5"], "--n_attn_modules"),
                         (["--variant=router_tuning", "--skip_layers=7"], "--skip_layers")):
        argv = [f"--dataset={dataset}", "--device=cpu", f"--init_from={tmp_path / 'base'}",
                f"--out_dir={tmp_path / 'out'}", *flags]
        assert named in user_error(capsys, train.main, argv)
        assert not (tmp_path / "out").exists()


def test_gpt2_offline_is_one_line_that_says_how_to_use_local_weights(dataset, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NANODEPTH_HF_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("NANODEPTH_CACHE", str(tmp_path / "cache"))
    err = user_error(capsys, train.main, tiny_flags(dataset, tmp_path / "out", init_from="gpt2"))
    assert "gpt2" in err and "local" in err and not (tmp_path / "out").exists()


def test_a_resumed_run_keeps_the_characters_it_was_trained_on(dataset, tmp_path):
    train.main(tiny_flags(dataset, tmp_path, max_iters=1, eval_interval=1))
    meta_path = Path(dataset) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["itos"] = {i: ch.upper() for i, ch in meta["itos"].items()}  # re-prepared in between
    meta_path.write_text(json.dumps(meta))
    train.main(tiny_flags(dataset, tmp_path, init_from="resume", max_iters=2, eval_interval=1))
    itos = torch.load(tmp_path / "ckpt.pt", weights_only=True)["itos"]
    assert itos == [chr(ord("a") + i) for i in range(16)]


def test_resume_is_not_refused_for_rates_an_earlier_version_allowed(dataset, tmp_path):
    train.main(tiny_flags(dataset, tmp_path, max_iters=1, eval_interval=1))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ckpt["config"].update(learning_rate=5e-5, min_lr=1e-4)  # min_lr above: accepted before
    torch.save(ckpt, tmp_path / "ckpt.pt")
    train.main(tiny_flags(dataset, tmp_path, init_from="resume", max_iters=2, eval_interval=1,
                          learning_rate=5e-5))
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["iter_num"] == 2
