"""
Router-tuning (mindskip.py): tuning touches only the routers and reaches closed gates
straight-through, the sparsity terms are their formulas, the score offset holds the realised
capacity at the target (also in short tunings whose routers move fast), the FLOP counts are
the convention's, and gates decide in float32.
The helpers and tiny configs are test_mindskip.py's.
"""

import math

import pytest
import torch

from mindskip import RECENT_STEPS, TUNED_BUFFERS, MindSkipGPT
from model import attention_flops
from test_mindskip import LEVELS, ROUTED, SKIPS, TINY, all_logits, dense_gpt, mindskip, record_gates, split_the_gates, tokens

torch.set_num_threads(1)

TUNE_STEPS = 60


def tune(model, steps=5, seed=5, batch=4, learning_rate=1e-2):
    """Steps of router-tuning as train.py does them: LM loss + lambda * sparsity term, AdamW
    (the model's own optimizer: no weight decay), learning rate decayed on a cosine to 0."""
    model.train()
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=learning_rate, betas=(0.9, 0.99), device_type="cpu")
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = learning_rate * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = tokens(seed + step, batch, 17)
        _, lm_loss, aux = model(idx[:, :-1], idx[:, 1:].contiguous())
        loss = lm_loss + sum(model.loss_weights[k] * v for k, v in aux.items())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("skip", SKIPS)
def test_tuning_leaves_every_backbone_tensor_unchanged_and_without_grad(skip, level):
    dense = dense_gpt()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    model = mindskip(dense, skip=skip, router_level=level, sparsity_coef=1.0)
    tune(model)
    for name, p in model.named_parameters():
        if name.startswith("routers."):
            assert p.requires_grad and torch.count_nonzero(p) > 0, name  # the routers did learn
        else:
            assert not p.requires_grad and p.grad is None, name
            assert torch.equal(p, before[name]), name
    assert all(torch.equal(v, before[k]) for k, v in dense.state_dict().items())  # the base too


@pytest.mark.parametrize("threshold", [0.5, 1.5], ids=["open", "closed"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("skip", SKIPS)
def test_lm_loss_alone_reaches_open_and_closed_gates_straight_through(skip, level, threshold):
    """A closed gate (a sequence's or a token's) must hear from the LM loss too, or with no
    sparsity term it could never reopen: tuning computes closed sublayers, times 0."""
    model = mindskip(dense_gpt(), skip=skip, router_level=level, gate_threshold=threshold).train()
    idx = tokens(13, 4, 17)
    _, lm_loss, _ = model(idx[:, :-1], idx[:, 1:].contiguous())
    lm_loss.backward()
    assert model.last_capacity.item() == (1.0 if threshold == 0.5 else 0.0)
    assert all(r.weight.grad is not None and torch.count_nonzero(r.weight.grad) > 0 for r in model.routers.values())


def test_checkpoint_holds_only_the_router_weights_and_base_plus_routers_rebuild_the_model():
    dense = dense_gpt()
    model = tune(mindskip(dense, sparsity_coef=5.0))
    state = model.checkpoint_state_dict()
    assert set(state) == {f"routers.{i}.weight" for i in ROUTED} | set(TUNED_BUFFERS)
    rebuilt = MindSkipGPT.from_dense(dense_gpt(), model.settings).eval()
    _, unexpected = rebuilt.load_state_dict(state, strict=False)
    assert not unexpected
    idx = tokens(6, 3, 16)
    assert torch.equal(all_logits(rebuilt, idx), all_logits(model, idx))


def router_inputs(model, idx):
    """The mean feature each router reads on idx, keyed by layer."""
    seen = {}
    hooks = [model.routers[str(i)].register_forward_pre_hook(lambda m, inp, i=i: seen.setdefault(i, inp[0]))
             for i in model.gated]
    model(idx)
    for h in hooks:
        h.remove()
    return {i: v.reshape(-1, v.size(-1)).mean(dim=0) for i, v in seen.items()}


@pytest.mark.parametrize("threshold, target, opens", [(0.5, 0.25, False), (1.5, 0.5, True)],
                         ids=["above-target-closes", "below-target-opens"])
def test_two_sided_penalty_is_the_squared_gap_and_pulls_from_either_side(threshold, target, opens):
    dense = dense_gpt()
    idx = tokens(7, 4, 16)
    model = mindskip(dense, target_capacity=target, sparsity_coef=0.7, gate_threshold=threshold)
    assert model.loss_weights == {"sparsity": 0.7}
    _, _, aux = model(idx, idx)  # zero routers: every gate open at 0.5, every gate shut at 1.5
    share = 1.0 if threshold == 0.5 else 0.0
    assert aux["sparsity"].item() == pytest.approx((share - target) ** 2)
    aux["sparsity"].backward()
    features = router_inputs(model, idx)
    for i in ROUTED:  # a gradient-descent step moves every score up (opens) or down (closes)
        step = -model.routers[str(i)].weight.grad[0]
        assert ((step @ features[i]) > 0) == opens


def test_penalty_counts_the_open_share_of_a_mixed_batch():
    dense = dense_gpt()
    idx = tokens(7, 4, 16)
    for target in (0.25, 0.5, 0.75):
        mixed = split_the_gates(mindskip(dense, target_capacity=target), idx)
        opened_at = record_gates(mixed)
        _, _, aux = mixed(idx, idx)
        mean_gate = torch.cat([opened_at[i][0] for i in ROUTED]).float().mean().item()
        assert 0 < mean_gate < 1
        assert aux["sparsity"].item() == pytest.approx((mean_gate - target) ** 2)


def test_the_official_sparsity_term_is_the_sum_over_layers_of_the_mean_gate():
    dense = dense_gpt()
    idx = tokens(7, 8, 16)
    model = split_the_gates(mindskip(dense, sparsity="official", sparsity_coef=0.3), idx)
    opened_at = record_gates(model)
    _, _, aux = model(idx, idx)
    expected = sum(opened_at[i][0].float().mean().item() for i in ROUTED)
    assert aux["sparsity"].item() == pytest.approx(expected) and model.loss_weights == {"sparsity": 0.3}


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("target", [0.25, 0.5, 0.75])
def test_tuning_reaches_the_target_capacity_on_held_out_sequences(target, level):
    """--target_capacity is the share of gates that end open, within 0.05, not only a ceiling."""
    model = mindskip(dense_gpt(), target_capacity=target, router_level=level)
    tune(model, steps=60, batch=16, learning_rate=3e-3)
    held_out = tokens(999, 256, 16)
    assert model.evaluate(held_out, held_out)["capacity"] == pytest.approx(target, abs=0.05)


def frozen_router_optimizer(model):
    """The model's own optimizer at learning rate 0: steps run its hooks but move no router."""
    return model.configure_optimizers(weight_decay=0.0, learning_rate=0.0, betas=(0.9, 0.99), device_type="cpu")


def test_score_offset_moves_after_tuning_steps_only_and_towards_the_target():
    """Like BatchNorm's running statistics: the optimizer step after a training forward moves
    the offset so that fewer gates open when more than the target did (and the other way
    round); the forward itself, eval forwards, the official sparsity term and forced
    thresholds leave it alone."""
    idx = tokens(7, 8, 16)
    for target, direction in ((0.25, -1), (0.75, 1)):
        model = split_the_gates(mindskip(dense_gpt(), target_capacity=target), idx)
        opt = frozen_router_optimizer(model)
        model(idx)
        opt.step()
        assert model.score_offset.item() == 0.0  # eval mode: nothing recorded
        assert 0.25 < model.last_capacity.item() < 0.75  # the split routers open about half of the gates
        model.train()(idx)
        assert model.score_offset.item() == 0.0  # recorded, not applied yet
        opt.step()
        assert math.copysign(1, model.score_offset.item()) == direction
    for settings in (dict(sparsity="official"), dict(gate_threshold=0.0), dict(gate_threshold=1.5)):
        model = split_the_gates(mindskip(dense_gpt(), target_capacity=0.25, **settings), idx)
        opt = frozen_router_optimizer(model)
        model.train()(idx)
        opt.step()
        assert model.score_offset.item() == 0.0, settings


def test_score_offset_opens_exactly_the_target_share_of_scores_held_still():
    """With the routers fixed, repeated tuning steps bring the open share to the target on the
    batch they see, where the penalty alone would need the routers to move."""
    idx = tokens(8, 16, 16)
    for level in LEVELS:
        model = split_the_gates(mindskip(dense_gpt(), target_capacity=0.3, router_level=level), idx).train()
        opt = frozen_router_optimizer(model)
        with torch.no_grad():
            for _ in range(300):
                model(idx)
                opt.step()
        model.eval()(idx)
        assert model.last_capacity.item() == pytest.approx(0.3, abs=0.04), level


def test_score_offset_opens_the_target_share_of_every_micro_batch_of_the_step_together():
    """Two micro-batches then one step: the offset opens exactly the target share of their
    gates together, as the current routers score them."""
    idx = tokens(9, 8, 16)
    model = mindskip(dense_gpt(), target_capacity=0.25, skip_layers="1")
    model = split_the_gates(model, idx).train()
    opt = frozen_router_optimizer(model)
    model(idx[:4])
    model(idx[4:])
    opt.step()
    assert model.recent_count.item() == 8
    model.eval()(idx)
    assert model.last_capacity.item() == 0.25


def test_score_offset_reads_only_the_last_recent_steps_inputs():
    """Inputs older than RECENT_STEPS steps are stale (a layer above a gate read what that gate
    decided then), so they must not move the offset: after many steps on other text, RECENT_STEPS
    steps on idx leave the offset opening exactly the target share of idx's gates."""
    idx, other = tokens(9, 8, 16), tokens(10, 8, 16)
    model = mindskip(dense_gpt(), target_capacity=0.25, skip_layers="1")
    model = split_the_gates(model, idx).train()
    opt = frozen_router_optimizer(model)
    with torch.no_grad():
        for batch in [other] * 40 + [idx] * RECENT_STEPS:
            model(batch)
            opt.step()
    assert model.recent_count.item() == 8 * (40 + RECENT_STEPS)  # the ring holds other's rows too
    model.eval()(idx)
    assert model.last_capacity.item() == 0.25


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("target", [0.25, 0.75])
def test_a_short_fast_tuning_with_few_gates_per_step_ends_at_the_target(target, level):
    """One gated layer, 32 sequences a step, 50 steps at a high learning rate: the routers move
    the scores of every gate together from step to step, faster than a running correction of
    the offset can follow; the offset scored on the recent inputs by the current routers
    follows them exactly. (The offset reads RECENT_STEPS steps, 512 sequences here: its
    quantile's sampling error, about 0.02, stays under the tolerance.)"""
    model = mindskip(dense_gpt(), skip_layers="2", target_capacity=target, router_level=level)
    tune(model, steps=50, batch=32, learning_rate=3e-2)
    held_out = tokens(998, 4096, 16)  # many, so that sampling moves the share by under 0.01
    assert model.evaluate(held_out, held_out)["capacity"] == pytest.approx(target, abs=0.05)


def test_flops_per_token_of_a_tuning_step_counts_no_weight_gradients():
    """Frozen matmuls cost 4 x their weights (no weight gradient), sublayers up to the first
    gate 2 x (no backward), attention 12 d T once gradients flow; routers 6 x d."""
    dense = dense_gpt()
    d, T, V, L = TINY["n_embd"], TINY["block_size"], TINY["vocab_size"], TINY["n_layer"]
    attn, mlp, att = 4 * d * d, 8 * d * d, 12 * d * T
    routers = 6 * d * len(ROUTED)
    forward_only_attn, forward_only_mlp = 2 * attn + att // 3, 2 * mlp
    with_grad_attn, with_grad_mlp = 4 * attn + att, 4 * mlp
    head = 4 * d * V
    # first gate on layer 1: layer 0 forward only, then layer 1's attention (attn, block) or its attention and MLP (mlp)
    assert mindskip(dense, skip="attn").flops_per_token() == (
        2 * (forward_only_attn) + forward_only_mlp + (L - 1) * with_grad_mlp + (L - 2) * with_grad_attn + head + routers)
    assert mindskip(dense, skip="block").flops_per_token() == mindskip(dense, skip="attn").flops_per_token()
    assert mindskip(dense, skip="mlp").flops_per_token() == (
        2 * (forward_only_attn + forward_only_mlp) + (L - 2) * (with_grad_attn + with_grad_mlp) + head + routers)
    assert mindskip(dense).flops_per_token() < dense.flops_per_token()


def test_inference_flops_drop_the_skipped_share_of_the_gated_sublayers():
    dense = dense_gpt()
    d, T = TINY["n_embd"], TINY["block_size"]
    router = 6 * d * len(ROUTED)
    forward = dense.flops_per_token() / 3
    for skip, saved in (("attn", 6 * 4 * d * d + attention_flops(d, T)), ("mlp", 6 * 8 * d * d),
                        ("block", 6 * 12 * d * d + attention_flops(d, T))):
        model = mindskip(dense, skip=skip)
        assert model.inference_flops_per_token(capacity=1.0) == pytest.approx(forward + router / 3)
        assert model.inference_flops_per_token(capacity=0.0) == pytest.approx(forward + (router - len(ROUTED) * saved) / 3)
        assert model.inference_flops_per_token() == model.inference_flops_per_token(capacity=0.5)  # default: the target
    token = mindskip(dense, router_level="token")  # c*T queries over c*T keys
    attn_term = attention_flops(d, T)
    assert (token.inference_flops_per_token(capacity=0.5) - token.inference_flops_per_token(capacity=0.0)
            == pytest.approx(len(ROUTED) * 0.5 * (6 * 4 * d * d + 0.5 * attn_term) / 3))


@pytest.mark.parametrize("level", LEVELS)
def test_gates_decide_in_float32_under_bfloat16_autocast(level):
    """A score in (-0.004, 0): float32 closes the gate, a bfloat16 sigmoid would round to 0.5 and open it."""
    dense = dense_gpt()
    idx = tokens(14, 2, 16)
    model = mindskip(dense, router_level=level)
    seen = []
    hook = model.routers[str(ROUTED[0])].register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
    model(idx)
    hook.remove()
    h = seen[0].mean(dim=1) if level == "sequence" else seen[0].reshape(-1, TINY["n_embd"])
    direction = h.mean(dim=0)
    with torch.no_grad():  # every score about -0.002 (the features share most of their direction)
        model.routers[str(ROUTED[0])].weight.copy_(-0.002 * direction / (direction @ direction))
    opened_at = record_gates(model)
    model(idx)
    assert not opened_at[ROUTED[0]][0].any()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx)
    assert torch.equal(opened_at[ROUTED[0]][1], opened_at[ROUTED[0]][0])
