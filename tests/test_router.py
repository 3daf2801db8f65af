"""router.py's functions compute the formulas their docstrings state (MoM's balance loss is
tested with MoM, in test_mom.py)."""

import torch

from router import (
    capacity_to_k, expert_choice_topk, indices_to_mask, pack_mask, straight_through_gate,
    threshold_route, topk_bce_loss,
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
