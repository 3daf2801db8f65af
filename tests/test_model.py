"""
GPT-2 baseline (model.py): shapes, weight tying, the KV cache and the training utilities
(loading GPT-2 weights: test_gpt2_weights.py). Everything is offline, tiny and seeded.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, GPTConfig, KVCache, block_matmul_params

torch.set_num_threads(1)

TINY = dict(block_size=16, vocab_size=50, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)


def tiny_gpt(seed=0, weight_std=None, **overrides):
    """A tiny random GPT. weight_std spreads the weights so that greedy decoding has clear
    winners (the default 0.02 init gives near-uniform logits and near ties)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides}))
    if weight_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, weight_std)
    return model.eval()


def all_logits(model, idx, cache=None, pos_offset=0):
    dummy_targets = torch.zeros(idx.shape, dtype=torch.long)  # only to get every position's logits
    logits, _, _ = model(idx, targets=dummy_targets, cache=cache, pos_offset=pos_offset)
    return logits


def sample_tokens(seed, B, T, vocab_size):
    return torch.randint(vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# --- forward / backward ------------------------------------------------------------------------

def test_forward_with_targets_gives_logits_for_every_position_and_a_finite_loss():
    model = tiny_gpt()
    idx = sample_tokens(1, 3, 10, TINY["vocab_size"])
    targets = sample_tokens(2, 3, 10, TINY["vocab_size"])
    logits, loss, aux = model(idx, targets=targets)
    assert logits.shape == (3, 10, TINY["vocab_size"])
    assert loss.shape == () and torch.isfinite(loss)
    assert aux == {} and model.loss_weights == {}
    # at init the model is close to uniform over the vocabulary
    assert abs(loss.item() - math.log(TINY["vocab_size"])) < 0.1


def test_backward_reaches_every_parameter_with_its_own_shape():
    model = tiny_gpt().train()
    idx = sample_tokens(1, 2, 12, TINY["vocab_size"])
    _, loss, _ = model(idx, targets=idx)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.shape == p.shape, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_logits_without_targets_are_the_last_position_only():
    model = tiny_gpt()
    idx = sample_tokens(2, 2, 9, TINY["vocab_size"])
    last, loss, _ = model(idx)
    assert loss is None
    assert last.shape == (2, 1, TINY["vocab_size"])
    torch.testing.assert_close(last, all_logits(model, idx)[:, -1:], rtol=0, atol=1e-6)


def test_targets_of_minus_one_are_ignored_by_the_loss():
    model = tiny_gpt()
    idx = sample_tokens(3, 2, 8, TINY["vocab_size"])
    targets = idx.clone()
    targets[:, :4] = -1
    logits, loss, _ = model(idx, targets=targets)
    expected = F.cross_entropy(logits[:, 4:].reshape(-1, logits.size(-1)), idx[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_targets_may_be_a_slice_of_a_larger_batch():
    model = tiny_gpt()
    batch = sample_tokens(3, 2, 12, TINY["vocab_size"])
    targets = batch[:, 1:9]  # not contiguous in memory
    _, loss, _ = model(batch[:, :8], targets=targets)
    _, expected, _ = model(batch[:, :8], targets=targets.contiguous())
    torch.testing.assert_close(loss, expected)


def test_lm_head_and_token_embedding_share_one_tensor():
    model = tiny_gpt()
    assert model.lm_head.weight is model.transformer.wte.weight
    n_unique = len({p.data_ptr() for p in model.parameters()})
    assert n_unique == len(list(model.parameters()))  # the tied tensor is counted once
    with torch.no_grad():
        model.transformer.wte.weight[3].fill_(0.5)
    assert torch.equal(model.lm_head.weight[3], torch.full((TINY["n_embd"],), 0.5))


def test_block_output_is_its_input_plus_the_attention_then_mlp_updates():
    model = tiny_gpt(weight_std=0.3)
    block = model.transformer.h[0]
    x = torch.randn(2, 7, TINY["n_embd"], generator=torch.Generator().manual_seed(4))
    h = x + block.attn_update(x)
    torch.testing.assert_close(block(x), h + block.mlp_update(h))


def test_a_sequence_longer_than_block_size_is_refused():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, TINY["block_size"] + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=model.new_cache(), pos_offset=TINY["block_size"] - 1)


# --- KV cache ----------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt_len", [1, 5, 15, 16, 21])
def test_cached_greedy_generation_equals_recomputing_the_window(prompt_len):
    """Runs past block_size (16), so the window slides and the cache restarts."""
    model = tiny_gpt(seed=7, weight_std=0.3)
    prompt = sample_tokens(prompt_len, 2, prompt_len, TINY["vocab_size"])
    cached = model.generate(prompt, max_new_tokens=24, temperature=0.0, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=24, temperature=0.0, use_cache=False)
    assert cached.shape == (2, prompt_len + 24)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, prompt_len:].tolist())) > 1  # not a degenerate repeat of one token


def test_prefill_then_decode_gives_the_full_forward_logits_at_every_position():
    model = tiny_gpt(seed=8, weight_std=0.3)
    idx = sample_tokens(9, 2, 13, TINY["vocab_size"])
    full = all_logits(model, idx)
    cache = model.new_cache()
    prefill = all_logits(model, idx[:, :5], cache=cache)
    chunk = all_logits(model, idx[:, 5:8], cache=cache, pos_offset=5)  # several new tokens at once
    steps = [model(idx[:, t:t + 1], cache=cache, pos_offset=t)[0] for t in range(8, 13)]
    cached = torch.cat([prefill, chunk, *steps], dim=1)
    assert prefill.shape == (2, 5, TINY["vocab_size"])
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_kv_cache_grows_by_one_key_and_one_value_per_token_and_layer():
    model = tiny_gpt(seed=10)
    B, C = 3, TINY["n_embd"]
    per_token = 2 * B * C * 4  # key + value, float32, all heads
    idx = sample_tokens(11, B, 9, TINY["vocab_size"])
    cache = model.new_cache()
    assert len(cache) == TINY["n_layer"] and all(isinstance(c, KVCache) for c in cache)
    assert all(len(c) == 0 and c.nbytes() == 0 for c in cache)
    model(idx[:, :6], cache=cache)
    assert all(len(c) == 6 and c.nbytes() == 6 * per_token for c in cache)
    for t in range(6, 9):
        model(idx[:, t:t + 1], cache=cache, pos_offset=t)
        assert all(len(c) == t + 1 and c.nbytes() == (t + 1) * per_token for c in cache)


# --- training utilities ------------------------------------------------------------------------

def test_crop_block_size_keeps_the_first_positions_and_refuses_longer_inputs():
    model = tiny_gpt(seed=12, weight_std=0.3)
    idx = sample_tokens(13, 2, 8, TINY["vocab_size"])
    before = all_logits(model, idx)
    wpe_before = model.transformer.wpe.weight[:8].clone()
    model.crop_block_size(8)
    assert model.config.block_size == 8
    assert model.transformer.wpe.weight.shape == (8, TINY["n_embd"])
    assert torch.equal(model.transformer.wpe.weight, wpe_before)
    torch.testing.assert_close(all_logits(model, idx), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="block_size"):
        model(sample_tokens(13, 1, 9, TINY["vocab_size"]))


def test_configure_optimizers_skips_frozen_params_and_decays_only_matrices():
    model = tiny_gpt()
    frozen = [model.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].ln_1.bias,
              model.transformer.wpe.weight]
    for p in frozen:
        p.requires_grad_(False)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type="cpu")
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert set(by_decay) == {0.1, 0.0}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert by_decay[0.1] == {id(p) for p in trainable if p.dim() >= 2}
    assert by_decay[0.0] == {id(p) for p in trainable if p.dim() == 1}
    assert not {id(p) for p in frozen} & (by_decay[0.1] | by_decay[0.0])
    n_listed = sum(len(g["params"]) for g in opt.param_groups)
    assert n_listed == len(trainable)  # the tied wte/lm_head tensor appears once


def test_block_matmul_params_counts_the_weights_of_a_block():
    model = tiny_gpt()
    block = model.transformer.h[0]
    weights = [block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj]
    assert block_matmul_params(TINY["n_embd"]) == sum(m.weight.numel() for m in weights)


def test_flops_per_token_follows_the_design_convention():
    model = GPT(GPTConfig(block_size=4, vocab_size=10, n_layer=2, n_head=2, n_embd=8))
    # per layer: 6 * 12 * 8^2 = 4608 (matmuls) + 12 * 8 * 4 = 384 (attention over T=4 keys);
    # two layers: 9984; LM head: 6 * 8 * 10 = 480; embeddings and norms are free
    assert model.flops_per_token() == 10464
    # at T=2 the attention term halves: 2 * (4608 + 192) + 480
    assert model.flops_per_token(seq_len=2) == 10080
