"""router.py's functions compute the formulas their docstrings state (MoM's balance loss is
tested with MoM, in test_mom.py), and every router decides in float32 under autocast."""

import pytest
import torch

from router import (
    CausalPredictor, DepthRouter, MindSkipGate, ModuleRouter, capacity_to_k, expert_choice_topk,
    indices_to_mask, pack_mask, straight_through_gate, threshold_route, topk_bce_loss,
)


def test_capacity_gives_at_least_one_token():
    assert capacity_to_k(0.125, 64) == 8
    assert capacity_to_k(0.01, 16) == 1
    assert capacity_to_k(1.0, 7) == 7


def test_expert_choice_topk_returns_the_largest_scores_sorted_by_position():
    torch.manual_seed(0)
    scores = torch.randn(4, 32)
    idx = expert_choice_topk(scores, 5)
    assert idx.shape == (4, 5)
    assert torch.all(idx[:, 1:] > idx[:, :-1])  # sorted and unique: the sub-sequence keeps causal order
    chosen = scores.gather(1, idx)
    kth_largest = scores.topk(5, dim=-1).values[:, -1:]
    assert torch.all(chosen >= kth_largest)


def test_indices_to_mask_marks_exactly_the_chosen_positions():
    mask = indices_to_mask(torch.tensor([[0, 3], [1, 2]]), 5)
    assert mask.tolist() == [[True, False, False, True, False], [False, True, True, False, False]]


def test_pack_mask_lists_chosen_positions_in_order_then_padding():
    mask = torch.tensor([[False, True, False, True, True], [True, False, False, False, False]])
    idx, valid = pack_mask(mask)
    assert idx[0].tolist() == [1, 3, 4]
    assert idx[1, 0].item() == 0 and valid[1].tolist() == [True, False, False]
    assert valid[0].all()
    assert sorted(idx[1].tolist()) == sorted(set(idx[1].tolist()))  # padding never repeats a position


def test_threshold_route_is_sigmoid_above_one_half():
    assert threshold_route(torch.tensor([-1.0, 0.0, 0.1])).tolist() == [False, False, True]


def test_topk_bce_loss_is_binary_cross_entropy_against_the_mask():
    logits = torch.tensor([[2.0, -1.0]])
    target = torch.tensor([[True, False]])
    p = torch.sigmoid(logits)
    expected = -(torch.log(p[0, 0]) + torch.log(1 - p[0, 1])) / 2
    assert torch.allclose(topk_bce_loss(logits, target), expected)


def test_straight_through_gate_is_hard_forward_and_sigmoid_derivative_backward():
    s = torch.tensor([-2.0, -0.1, 0.0, 0.3, 4.0], requires_grad=True)
    gate = straight_through_gate(s)
    assert gate.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]  # 1[sigmoid(s) >= 0.5]
    gate.sum().backward()
    sig = torch.sigmoid(s.detach())
    assert torch.allclose(s.grad, sig * (1 - sig))


# --- decisions in float32 under autocast --------------------------------------------------------

def rows_scoring_near_zero(weight, n, seed):
    """n rows x with x . weight spread over (-0.01, 0.01) in float32: large features whose
    products cancel, where bfloat16's rounding (of x, the product, sigmoid) flips decisions."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, weight.numel(), generator=g)
    wanted = (torch.rand(n, generator=g) - 0.5) * 0.02
    return x + ((wanted - x @ weight) / (weight @ weight))[:, None] * weight


def same_under_bfloat16_autocast(decide, x):
    """decide(x) in float32 and under CPU bfloat16 autocast, on x and on x rounded to bfloat16."""
    for inputs in (x, x.bfloat16()):
        want = decide(inputs.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = decide(inputs)
        differ = (got != want).sum().item()
        assert differ == 0, f"{differ} of {want.numel()} decisions differ"


@pytest.mark.parametrize("level", ["sequence", "token"])
def test_mindskip_gates_decide_as_in_float32_under_bfloat16_autocast(level):
    gate = MindSkipGate(64, level)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(1, 64, generator=torch.Generator().manual_seed(0)))
    x = rows_scoring_near_zero(gate.weight[0], 4 * 8, seed=1).view(4, 8, 64)
    if level == "sequence":  # each row's mean over its tokens scores near zero
        x = x[:, :1] + x - x.mean(dim=1, keepdim=True)
    same_under_bfloat16_autocast(lambda h: gate(h)[0], x)


def test_mod_router_and_predictor_decide_as_in_float32_under_bfloat16_autocast():
    torch.manual_seed(0)
    router, predictor = DepthRouter(64), CausalPredictor(64)
    with torch.no_grad():
        router.bias.zero_()
        x = rows_scoring_near_zero(router.weight[0], 4 * 32, seed=2).view(4, 32, 64)
        out = predictor[2]  # centre the predictor's logits on 0 with a spread of about 0.005
        logits = predictor(x)
        out.weight.mul_(0.005 / logits.std())
        out.bias.copy_(out.bias * 0.005 / logits.std() - predictor(x).mean())
    same_under_bfloat16_autocast(lambda h: threshold_route(router(h)), x)
    same_under_bfloat16_autocast(lambda h: expert_choice_topk(router(h), 8), x)
    same_under_bfloat16_autocast(lambda h: threshold_route(predictor(h)), x)


def test_mom_router_chooses_as_in_float32_under_bfloat16_autocast():
    torch.manual_seed(0)
    router = ModuleRouter(64, 5, "gru", steps=2)
    with torch.no_grad():  # logits about 1 apart by about 0.005: below bfloat16's step there
        router.out.weight.mul_(0.01)
        router.out.bias.fill_(1.0)
    x = torch.randn(4, 32, 64)
    same_under_bfloat16_autocast(lambda h: router(h, None, 0)[0].argmax(dim=-1), x)
