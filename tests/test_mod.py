"""Mixture-of-Depths keeps the properties DESIGN.md lists: top-k per sequence, untouched
unrouted tokens, a single residual, the right attention mask, router gradients, and causal
routing that generation (with or without a KV cache) can trust."""

import pytest
import torch
import torch.nn.functional as F

from mod import MoDConfig, MoDGPT
from model import GPT, GPTConfig, RowKVCache, attention_flops, block_matmul_params
from router import add_rows_

CONFIG = dict(block_size=32, vocab_size=40, n_layer=4, n_head=2, n_embd=32)


def tiny_mod(seed=0, **settings):
    torch.manual_seed(seed)
    return MoDGPT(GPTConfig(**CONFIG), MoDConfig(**settings)).eval()


def decisive_routers(model, bias=0.0):
    """Router scores far from the 0.5 threshold (a random init scores every token near 0),
    so float rounding never flips a causal decision between two equal computations."""
    with torch.no_grad():
        for block in model.routed_blocks().values():
            block.router.weight.normal_(0.0, 5.0)
            block.router.bias.fill_(bias)
    return model


def tiny_routed_block(seed=0, **settings):
    torch.manual_seed(seed)
    model = MoDGPT(GPTConfig(**CONFIG), MoDConfig(**settings)).eval()
    block = model.transformer.h[1]
    with torch.no_grad():  # non-trivial weights everywhere, including the output projections
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block


def dense_reference(routed_block, x, selected):
    """The routed block computed densely: attention over all tokens with the mask
    selected_i & selected_j & j <= i, update scaled by sigmoid(r), unselected tokens kept."""
    block, (B, T, C) = routed_block.block, x.shape
    q, k, v = block.attn.c_attn(block.ln_1(x)).split(C, dim=2)
    q, k, v = (t.view(B, T, block.attn.n_head, -1).transpose(1, 2) for t in (q, k, v))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = selected[:, None, :, None] & selected[:, None, None, :] & causal
    mask = mask | torch.eye(T, dtype=torch.bool)  # unselected rows see themselves; their output is dropped
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    attn = block.attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
    f = attn + block.mlp_update(x + attn)
    w = torch.sigmoid(routed_block.router(x)).unsqueeze(-1)
    return torch.where(selected[..., None], x + w * f, x)


# --- top-k routing ---------------------------------------------------------------------------

@pytest.mark.parametrize("seq_len, k", [(32, 4), (13, 2), (3, 1)])
def test_every_routed_block_takes_exactly_k_tokens_of_each_sequence(seq_len, k):
    model = tiny_mod()
    idx = torch.randint(CONFIG["vocab_size"], (3, seq_len))
    model(idx)
    for block in model.routed_blocks().values():
        assert block.routed_mask.shape == (3, seq_len)
        assert block.routed_mask.sum(dim=1).tolist() == [k, k, k]


def test_every_other_block_is_routed_starting_with_the_second():
    assert list(tiny_mod().routed_blocks()) == [1, 3]
    assert list(tiny_mod(route_every=1).routed_blocks()) == [0, 1, 2, 3]


@pytest.mark.parametrize("mode", ["topk", "causal"])
def test_unrouted_tokens_pass_through_bit_identical(mode):
    block = tiny_routed_block(capacity=0.25)
    x = torch.randn(3, 16, CONFIG["n_embd"])
    out, _ = block(x, mode)
    unrouted = ~block.routed_mask
    assert unrouted.any() and block.routed_mask.any()
    assert torch.equal(out[unrouted], x[unrouted])
    assert not torch.allclose(out[block.routed_mask], x[block.routed_mask])


def test_add_rows_equals_index_add_in_value_and_gradient_and_keeps_only_the_index():
    x, rows = torch.randn(6, 4, requires_grad=True), torch.randn(3, 4, requires_grad=True)
    index = torch.tensor([4, 0, 2])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = add_rows_(x.clone(), index, rows)
    reference = x.index_add(0, index, rows)
    assert torch.equal(out, reference)
    grad = torch.randn(6, 4)
    for ours, theirs in zip(torch.autograd.grad(out, (x, rows), grad), torch.autograd.grad(reference, (x, rows), grad)):
        assert torch.equal(ours, theirs)
    assert len(saved) == 1 and torch.equal(saved[0], index)  # not a copy of rows


@pytest.mark.parametrize("mode", ["topk", "causal"])
def test_zeroed_output_projections_make_the_routed_block_the_identity(mode):
    block = tiny_routed_block(capacity=0.5)
    with torch.no_grad():
        for proj in (block.block.attn.c_proj, block.block.mlp.c_proj):
            proj.weight.zero_()
            proj.bias.zero_()
    x = torch.randn(2, 16, CONFIG["n_embd"])
    out, _ = block(x, mode)
    assert torch.equal(out, x)  # f = 0 leaves x: the residual is added once, never scaled


def test_topk_routing_matches_a_dense_reference_with_the_routed_attention_mask():
    block = tiny_routed_block(capacity=0.25)
    x = torch.randn(3, 16, CONFIG["n_embd"])
    scores = block.router(x)
    selected = scores >= scores.topk(4, dim=-1).values[:, -1:]  # the 4 highest of each row
    out, _ = block(x, "topk")
    assert torch.equal(block.routed_mask, selected)
    assert torch.allclose(out, dense_reference(block, x, selected), atol=1e-5)


def test_causal_routing_of_a_batch_matches_the_dense_reference_row_by_row():
    block = tiny_routed_block()
    x = torch.randn(4, 16, CONFIG["n_embd"])
    selected = torch.sigmoid(block.router(x)) > 0.5
    assert len(set(selected.sum(dim=1).tolist())) > 1  # rows route different numbers of tokens
    out, _ = block(x, "causal")
    assert torch.equal(block.routed_mask, selected)
    assert torch.allclose(out, dense_reference(block, x, selected), atol=1e-5)


def test_capacity_one_with_router_weight_one_equals_the_dense_model():
    torch.manual_seed(0)
    dense = GPT(GPTConfig(**CONFIG)).eval()
    model = MoDGPT.from_dense(dense, MoDConfig(capacity=1.0)).eval()
    with torch.no_grad():
        for block in model.routed_blocks().values():
            block.router.weight.zero_()
            block.router.bias.fill_(30.0)  # sigmoid(30) == 1 in float32
    idx = torch.randint(CONFIG["vocab_size"], (2, 32))
    expected, _, _ = dense(idx, idx)
    got, _, _ = model(idx, idx)
    assert torch.allclose(got, expected, atol=1e-5)


def test_from_dense_copies_every_dense_weight_and_adds_fresh_routers():
    torch.manual_seed(0)
    dense = GPT(GPTConfig(**CONFIG))
    model = MoDGPT.from_dense(dense, MoDConfig())
    mine = {k.replace(".block.", "."): v for k, v in model.state_dict().items() if "router" not in k}
    assert mine.keys() == dense.state_dict().keys()
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in mine.items())


# --- gradients -------------------------------------------------------------------------------

def test_router_gets_gradient_from_the_lm_loss_alone():
    model = tiny_mod().train()
    idx = torch.randint(CONFIG["vocab_size"], (2, 32))
    _, lm_loss, _ = model(idx, idx)
    lm_loss.backward()
    for block in model.routed_blocks().values():
        assert block.router.weight.grad is not None and block.router.weight.grad.abs().sum() > 0


def test_predictor_loss_sends_zero_gradient_into_the_backbone():
    model = tiny_mod(causal_method="predictor").train()
    idx = torch.randint(CONFIG["vocab_size"], (2, 32))
    _, _, aux = model(idx, idx)
    assert set(aux) == {"predictor_bce"} == set(model.loss_weights)
    aux["predictor_bce"].backward()
    for name, p in model.named_parameters():
        if ".predictor." in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None or not p.grad.any(), name


def test_aux_loss_method_trains_the_router_towards_topk_membership():
    model = tiny_mod(causal_method="aux_loss").train()
    idx = torch.randint(CONFIG["vocab_size"], (2, 32))
    _, _, aux = model(idx, idx)
    assert set(aux) == {"router_bce"} == set(model.loss_weights)
    aux["router_bce"].backward()
    assert all(b.router.weight.grad.abs().sum() > 0 for b in model.routed_blocks().values())


# --- causal mode and generation --------------------------------------------------------------

@pytest.mark.parametrize("method", ["aux_loss", "predictor"])
def test_causal_mode_never_lets_future_tokens_change_earlier_logits(method):
    model = decisive_routers(tiny_mod(causal_method=method))
    if method == "predictor":
        with torch.no_grad():
            for block in model.routed_blocks().values():
                block.predictor[-1].weight.normal_(0.0, 5.0)
    idx = torch.randint(CONFIG["vocab_size"], (2, 32))
    changed = idx.clone()
    changed[:, 16:] = torch.randint(CONFIG["vocab_size"], (2, 16))
    with model.routing("causal"):
        before, after = model(idx, idx)[0], model(changed, changed)[0]
    assert torch.allclose(before[:, :16], after[:, :16], atol=1e-5)
    with model.routing("topk"):  # the check can fail: top-k does peek at the future
        before, after = model(idx, idx)[0], model(changed, changed)[0]
    assert not torch.allclose(before[:, :16], after[:, :16], atol=1e-5)


def test_token_by_token_cached_decoding_equals_the_full_causal_forward():
    model = decisive_routers(tiny_mod(), bias=-0.5)
    idx = torch.randint(CONFIG["vocab_size"], (3, 24))
    with model.routing("causal"):
        full, _, _ = model(idx, idx)
        routed_full = {i: b.routed_mask.clone() for i, b in model.routed_blocks().items()}
        cache = model.new_cache()
        steps = [model(idx[:, :5], cache=cache)[0][:, -1]]  # prefill a 5-token prompt
        steps += [model(idx[:, t:t + 1], cache=cache, pos_offset=t)[0][:, -1] for t in range(5, 24)]
    assert any(not m[:, :5].all() for m in routed_full.values())  # some prompt tokens were skipped
    assert torch.allclose(torch.stack(steps, dim=1), full[:, 4:], atol=1e-5)
    for i, routed in routed_full.items():  # a routed block caches exactly the tokens it routed
        assert isinstance(cache[i], RowKVCache)
        assert [len(cache[i].row(b)) for b in range(3)] == routed.sum(dim=1).tolist()
        assert len(set(routed.sum(dim=1).tolist())) > 1  # rows of the batch differ


def test_cached_greedy_generation_equals_recomputing_the_full_sequence():
    model = decisive_routers(tiny_mod(seed=1), bias=-1.0)
    prompt = torch.randint(CONFIG["vocab_size"], (3, 4))
    cached = model.generate(prompt, 20, temperature=0, use_cache=True)
    recomputed = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert model.routing_mode == "topk"  # generate switched to causal and back


def test_unrouted_decode_tokens_skip_the_block_write_nothing_and_never_give_nan():
    model = decisive_routers(tiny_mod(), bias=-1e4)  # no token is ever routed
    calls = []
    for block in model.routed_blocks().values():
        block.block.attn.register_forward_hook(lambda *args: calls.append(1))
    idx = torch.randint(CONFIG["vocab_size"], (2, 8))
    with model.routing("causal"):
        cache = model.new_cache()
        steps = [model(idx[:, t:t + 1], cache=cache, pos_offset=t)[0] for t in range(8)]
        assert not calls  # the routed blocks' attention never ran while decoding
        full, _, _ = model(idx, idx)
    assert all(torch.isfinite(s).all() for s in steps)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    assert all(cache[i].nbytes() == 0 for i in model.routed_blocks())


def test_depth_per_token_is_the_depth_cached_decoding_used_also_past_the_first_window():
    model = decisive_routers(tiny_mod(seed=2), bias=-0.5)
    used = []  # per forward of generate(): the depth of its newest position, or of the whole prompt

    def record(module, args, output):
        skipped = sum((~b.routed_mask).float() for b in model.routed_blocks().values())
        used.append(1 - skipped / CONFIG["n_layer"])

    hook = model.register_forward_hook(record)
    prompt = torch.randint(CONFIG["vocab_size"], (2, 5))
    idx = model.generate(prompt, 50, temperature=1.0, use_cache=True)  # 55 tokens, a 32-token context
    hook.remove()
    expected = torch.cat([used[0]] + [u[:, -1:] for u in used[1:]], dim=1)  # tokens 0 .. 53 as first run
    depth = model.depth_per_token(idx, prompt_len=5)
    assert depth.shape == (2, 55) and model.routing_mode == "topk"
    assert torch.equal(depth[:, :54], expected) and depth[:, 54].isnan().all()  # the last token never ran
    assert depth[:, :54].min() >= 0.5 and depth[:, :54].min() < 1  # 2 dense blocks always, 2 routed sometimes
    with model.routing("causal"):  # what a forward per window says differs past the first window
        model(idx[:, 32:54])
    skipped = sum((~b.routed_mask).float() for b in model.routed_blocks().values())
    assert not torch.equal(depth[:, 32:54], 1 - skipped / CONFIG["n_layer"])


def test_cached_forward_in_topk_mode_is_refused():
    model = tiny_mod()
    with pytest.raises(ValueError, match="causal"):
        model(torch.zeros(1, 1, dtype=torch.long), cache=model.new_cache())


# --- evaluation and cost ---------------------------------------------------------------------

def test_evaluate_reports_causal_loss_as_the_val_loss_and_routing_metrics():
    model = decisive_routers(tiny_mod())
    idx = torch.randint(CONFIG["vocab_size"], (2, 32))
    metrics = model.evaluate(idx, idx)
    with model.routing("causal"):
        causal_loss = model(idx, idx)[1].item()
    with model.routing("topk"):
        topk_loss = model(idx, idx)[1].item()
    assert metrics["loss"] == pytest.approx(causal_loss) and metrics["loss_topk"] == pytest.approx(topk_loss)
    assert set(metrics) == {"loss", "loss_topk"} | {f"{name}_{i}" for i in (1, 3) for name in
                                                     ("routed_frac", "causal_precision", "causal_recall")}
    assert 0 < metrics["routed_frac_1"] < 1


def test_causal_precision_and_recall_score_causal_routing_against_topk_membership():
    model = decisive_routers(tiny_mod())
    idx = torch.randint(CONFIG["vocab_size"], (2, 32))
    metrics = model.evaluate(idx, idx)
    with model.routing("topk"):  # both choices on the same (top-k mode) hidden states
        model(idx, idx)
    for i, block in model.routed_blocks().items():
        causal, topk = block.causal_choice, block.routed_mask
        assert 0 < (causal & topk).sum() < causal.sum()  # the case where the two scores differ
        assert metrics[f"causal_precision_{i}"] == pytest.approx(((causal & topk).sum() / causal.sum()).item())
        assert metrics[f"causal_recall_{i}"] == pytest.approx(((causal & topk).sum() / topk.sum()).item())


def test_a_router_that_never_routes_scores_zero_recall_not_high_agreement():
    model = decisive_routers(tiny_mod(), bias=-1e4)  # causal routing sends no token through
    metrics = model.evaluate(*(2 * [torch.randint(CONFIG["vocab_size"], (2, 32))]))
    for i in model.routed_blocks():  # agreement over all tokens would read 1 - C = 0.875
        assert metrics[f"routed_frac_{i}"] == 0
        assert metrics[f"causal_recall_{i}"] == 0 and metrics[f"causal_precision_{i}"] == 0


def test_the_router_bias_moves_causal_decisions_but_never_the_topk_choice():
    model = decisive_routers(tiny_mod(), bias=0.0)
    idx = torch.randint(CONFIG["vocab_size"], (2, 32))
    choices = []
    for bias in (0.0, 3.0):
        with torch.no_grad():
            for block in model.routed_blocks().values():
                block.router.bias.fill_(bias)
        with model.routing("topk"):
            model(idx)
        block = model.routed_blocks()[1]
        choices.append((block.routed_mask.clone(), block.causal_choice.clone()))
    assert torch.equal(choices[0][0], choices[1][0])  # top-k: the same tokens
    assert choices[1][1].sum() > choices[0][1].sum()  # causal: more tokens over the threshold


def test_routed_blocks_count_c_of_their_matmuls_and_c_squared_of_attention():
    model = tiny_mod(capacity=0.25)
    d, T, V = CONFIG["n_embd"], CONFIG["block_size"], CONFIG["vocab_size"]
    dense_block = 6 * block_matmul_params(d) + attention_flops(d, T)
    routed_block = 0.25 * 6 * block_matmul_params(d) + 0.25 ** 2 * attention_flops(d, T) + 6 * d
    assert model.flops_per_token() == pytest.approx(2 * dense_block + 2 * routed_block + 6 * d * V)
    assert model.flop_ceiling() == pytest.approx(GPT.flops_per_token(model) / model.flops_per_token())


def test_gpt2_small_at_1024_tokens_has_a_flop_ceiling_near_one_and_a_half():
    torch.manual_seed(0)
    with torch.device("meta"):  # no memory: only the parameter shapes matter
        model = MoDGPT(GPTConfig(), MoDConfig())
    assert model.flop_ceiling() == pytest.approx(1.48, abs=0.01)


# --- settings --------------------------------------------------------------------------------

def test_the_fused_kernels_are_opt_in():
    assert MoDConfig().kernels == "torch"
    assert tiny_mod().routed_blocks()[1].kernel_impl == "torch"


@pytest.mark.parametrize("settings, flag", [
    (dict(capacity=0.0), "--capacity"),
    (dict(capacity=1.5), "--capacity"),
    (dict(route_every=0), "--route_every"),
    (dict(causal_method="oracle"), "--causal_method"),
    (dict(aux_loss_coef=-0.1), "--aux_loss_coef"),
    (dict(predictor_coef=-1.0), "--predictor_coef"),
])
def test_bad_settings_raise_a_value_error_naming_the_flag(settings, flag):
    with pytest.raises(ValueError, match=flag):
        MoDConfig(**settings)


def test_routing_no_block_or_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="--route_every"):
        MoDGPT(GPTConfig(**CONFIG), MoDConfig(route_every=5))
    with pytest.raises(ValueError, match="routing_mode"):
        with tiny_mod().routing("sideways"):
            pass
