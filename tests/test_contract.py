"""The variant contract is enough: a variant defined in this file (layer dropping by a fixed
mask), registered at run time, trains, resumes exactly, samples and is benchmarked through the
entry points' main(argv) with no project file touched, and every registered variant passes the
same check. Registration refuses a class that misses a member; an auxiliary loss without a
weight is named at the first step."""

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import bench
import sample
import train
from conftest import tiny_flags
from model import GPT, attention_flops, block_matmul_params
from test_train import logged_losses
from variants import CONTRACT, VARIANTS, register

REPO = Path(__file__).resolve().parent.parent
TINY_BENCH = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32", "--vocab_size=64",
              "--device=cpu", "--batch_size=2", "--steps=1", "--warmup=0", "--repeats=1"]


@dataclass
class LayerDropConfig:
    drop_every: int = 2  # every drop_every-th block is skipped, for every token

    def __post_init__(self):
        if self.drop_every < 2:
            raise ValueError(f"--drop_every must be at least 2, got {self.drop_every}")


class LayerDropGPT(GPT):
    """GPT-2 that always skips every drop_every-th block: x <- x for a dropped block."""

    ddp_find_unused_parameters = True  # a dropped block gets no gradient

    def __init__(self, config, settings):
        super().__init__(config)
        self.settings = settings
        self.keep = [(i + 1) % settings.drop_every != 0 for i in range(config.n_layer)]

    def forward_trunk(self, x, cache=None):
        for i, block in enumerate(self.transformer.h):
            if self.keep[i]:
                x = block(x, None if cache is None else cache[i])
        return x, {}

    def flops_per_token(self, seq_len=None):
        T, d = seq_len or self.config.block_size, self.config.n_embd
        per_block = 6 * block_matmul_params(d) + attention_flops(d, T)
        return sum(self.keep) * per_block + 6 * d * self.config.vocab_size

    def depth_per_token(self, idx, prompt_len):
        return torch.full(idx.shape, sum(self.keep) / len(self.keep))


@pytest.fixture(autouse=True)
def layerdrop():
    register("layerdrop", LayerDropGPT, LayerDropConfig)
    yield
    VARIANTS.pop("layerdrop")


def git_status():
    done = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True,
                          text=True)
    return done.stdout if done.returncode == 0 else None


@pytest.mark.parametrize("variant", [*VARIANTS, "layerdrop"])
def test_a_variant_trains_resumes_samples_and_benches_through_the_entry_points(
        variant, dataset, tmp_path, capsys):
    before = git_status()
    flags = dict(variant=variant)
    if VARIANTS[variant][0].starts_from_dense:
        train.main(tiny_flags(dataset, tmp_path / "base", max_iters=2))
        flags["init_from"] = tmp_path / "base"
    capsys.readouterr()
    train.main(tiny_flags(dataset, tmp_path / "full", **flags))
    full = logged_losses(capsys.readouterr().out)
    train.main(tiny_flags(dataset, tmp_path / "split", max_iters=6, **flags))
    capsys.readouterr()
    train.main(tiny_flags(dataset, tmp_path / "split", init_from="resume"))
    resumed = logged_losses(capsys.readouterr().out)
    assert sorted(resumed) == list(range(6, 12)) and all(resumed[i] == full[i] for i in resumed)

    sample.main([f"--out_dir={tmp_path / 'split'}", "--start=abc", "--num_samples=1",
                 "--max_new_tokens=5", "--show_depth=True", "--device=cpu"])
    assert "mean depth per generated token" in capsys.readouterr().out
    for mode in ([], ["--decode=True", "--max_new_tokens=6"]):
        bench.main(TINY_BENCH + [f"--variants={variant}", *mode])
        assert any(line.startswith(variant) for line in capsys.readouterr().out.splitlines())
    bench.main([f"--checkpoints={tmp_path / 'split'}", "--prefill=True", "--repeats=1",
                "--device=cpu"])
    assert f" {variant} " in capsys.readouterr().out
    assert git_status() == before  # nothing of the project was written


def test_the_throwaway_variant_drops_its_blocks():
    model = LayerDropGPT(train.GPTConfig(block_size=8, vocab_size=16, n_layer=4, n_head=2,
                                         n_embd=16), LayerDropConfig(drop_every=2))
    assert model.keep == [True, False, True, False]
    dense = GPT(model.config)
    assert model.flops_per_token() < dense.flops_per_token()


def test_registering_a_class_without_a_contract_member_names_it():
    class Trunk(nn.Module):
        def forward_trunk(self, x, cache=None):
            return x, {}

    with pytest.raises(TypeError, match="'from_dense'"):
        register("trunk", Trunk)
    assert "trunk" not in VARIANTS and all(hasattr(GPT, member) for member in CONTRACT)


def test_an_aux_loss_without_a_weight_is_named_at_the_first_step(dataset, tmp_path):
    class Penalised(LayerDropGPT):
        def forward_trunk(self, x, cache=None):
            x, _ = super().forward_trunk(x, cache)
            return x, {"drop_penalty": x.pow(2).mean()}

    register("penalised", Penalised, LayerDropConfig)
    try:
        with pytest.raises(ValueError, match="Penalised.*'drop_penalty'.*loss_weights"):
            train.main(tiny_flags(dataset, tmp_path, variant="penalised", max_iters=2))
    finally:
        VARIANTS.pop("penalised")
