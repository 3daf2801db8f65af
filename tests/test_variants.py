"""What every variant owes generation, checked the same way for each: cached decoding gives the
tokens of recomputation, and later tokens never change earlier logits."""

import pytest
import torch

from mindskip import MindSkipConfig, MindSkipGPT
from mod import MoDConfig, MoDGPT
from model import GPT, GPTConfig
from mom import MoMConfig, MoMGPT

CONFIG = GPTConfig(block_size=24, vocab_size=40, n_layer=4, n_head=2, n_embd=32, dropout=0.0)


def spread(model, std, seed):
    """Random weights wide enough that greedy decoding has clear winners and gates both open and
    close (zero-initialised MindSkip routers would keep every gate open)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def build(variant):
    torch.manual_seed(0)
    if variant == "baseline":
        return spread(GPT(CONFIG), 0.3, 1)
    if variant == "mod":
        return spread(MoDGPT(CONFIG, MoDConfig(capacity=0.5, route_every=1)), 0.3, 1)
    if variant == "mom":
        return spread(MoMGPT(CONFIG, MoMConfig(modules_per_step=2)), 0.3, 1)
    level = variant.removeprefix("router_tuning_")
    return spread(MindSkipGPT.from_dense(GPT(CONFIG), MindSkipConfig(router_level=level, skip_layers="1,2")), 0.3, 1)


ALL = ["baseline", "mod", "mom", "router_tuning_sequence", "router_tuning_token"]


def all_logits(model, idx):
    """Logits at every position, as generation would compute them (MoD: causal routing)."""
    if isinstance(model, MoDGPT):
        with model.routing("causal"):
            return model(idx, idx)[0]
    return model(idx, idx)[0]


@pytest.mark.parametrize("variant", ALL)
def test_cached_greedy_generation_gives_the_tokens_of_recomputation(variant):
    model = build(variant)
    prompt = torch.randint(CONFIG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    cached = model.generate(prompt, 10, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 10, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("variant", [v for v in ALL if v != "router_tuning_sequence"])
def test_changing_future_tokens_never_changes_earlier_logits(variant):
    """(A sequence-level gate reads the whole sequence by design; generation decides it on the
    prompt, which the test above checks.)"""
    model = build(variant)
    a = torch.randint(CONFIG.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    b = a.clone()
    b[:, 12:] = (b[:, 12:] + 1) % CONFIG.vocab_size
    torch.testing.assert_close(all_logits(model, a)[:, :12], all_logits(model, b)[:, :12], rtol=0, atol=1e-5)
