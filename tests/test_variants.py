"""What every variant owes generation, checked the same way for each: cached decoding gives the
tokens of recomputation, and later tokens never change earlier logits."""

import pytest
import torch

from model import GPT, GPTConfig
from variants import VARIANTS

CONFIG = GPTConfig(block_size=24, vocab_size=40, n_layer=4, n_head=2, n_embd=32, dropout=0.0)

# every registered variant at its default settings, and a few settings worth checking too
CASES = {name: (name, {}) for name in VARIANTS}
CASES.update({"mod_every_block": ("mod", dict(capacity=0.5, route_every=1)),
              "mom_two_per_step": ("mom", dict(modules_per_step=2)),
              "router_tuning_token": ("router_tuning", dict(router_level="token"))})
READS_WHOLE_SEQUENCE = {"router_tuning"}  # one gate per sequence, decided on the prompt


def spread(model, std, seed):
    """Random weights wide enough that greedy decoding has clear winners and gates both open and
    close (zero-initialised MindSkip routers would keep every gate open)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def build(case):
    """The case's model with spread random weights, built as train.py builds it."""
    name, overrides = CASES[case]
    cls, settings_cls = VARIANTS[name]
    settings = settings_cls(**overrides) if settings_cls else None
    torch.manual_seed(0)
    dense = cls.starts_from_dense
    model = cls.from_dense(GPT(CONFIG), settings) if dense else cls(CONFIG, settings)
    return spread(model, 0.3, 1)


def all_logits(model, idx):
    """Logits at every position, as generation would compute them (a model with a routing
    mode, MoD, routes causally when generating)."""
    if hasattr(model, "routing"):
        with model.routing("causal"):
            return model(idx, idx)[0]
    return model(idx, idx)[0]


@pytest.mark.parametrize("case", CASES)
def test_cached_greedy_generation_gives_the_tokens_of_recomputation(case):
    model = build(case)
    prompt = torch.randint(CONFIG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    cached = model.generate(prompt, 10, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 10, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("case", [c for c in CASES if c not in READS_WHOLE_SEQUENCE])
def test_changing_future_tokens_never_changes_earlier_logits(case):
    """(A sequence-level gate reads the whole sequence by design; generation decides it on the
    prompt, which the test above checks.)"""
    model = build(case)
    a = torch.randint(CONFIG.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    b = a.clone()
    b[:, 12:] = (b[:, 12:] + 1) % CONFIG.vocab_size
    torch.testing.assert_close(all_logits(model, a)[:, :12], all_logits(model, b)[:, :12], rtol=0, atol=1e-5)
