"""
Properties the course's exercises are checked by that the technique tests leave implicit or
test only through a later exercise's code (course/exercises.toml): top-k at its extremes,
padding in MoD's routed update, and
MindSkip's capacity term with its straight-through gradient, on router.py's functions alone.
"""

import pytest
import torch

from mod import MoDConfig, MoDGPT
from model import GPTConfig
from router import capacity_penalty, expert_choice_topk, pack_mask, straight_through_gate

CONFIG = dict(block_size=32, vocab_size=40, n_layer=2, n_head=2, n_embd=32)


def routed_block(seed=0, capacity=0.25):
    """The routed block of a tiny MoD, with non-trivial weights everywhere."""
    torch.manual_seed(seed)
    model = MoDGPT(GPTConfig(**CONFIG), MoDConfig(capacity=capacity)).eval()
    block = model.transformer.h[1]
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.3)
    return block


def test_expert_choice_topk_at_its_extremes_takes_every_token_or_each_rows_best():
    scores = torch.randn(3, 7, generator=torch.Generator().manual_seed(0))
    assert torch.equal(expert_choice_topk(scores, 7), torch.arange(7).expand(3, 7))  # C = 1
    assert torch.equal(expert_choice_topk(scores, 1), scores.argmax(dim=1, keepdim=True))


def test_mod_add_update_changes_only_the_valid_packed_positions():
    block = routed_block()
    x = torch.randn(3, 10, CONFIG["n_embd"])
    chosen = torch.zeros(3, 10, dtype=torch.bool)
    chosen[0, [1, 4, 7]] = chosen[1, [2]] = chosen[2, [0, 9]] = True  # 3, 1 and 2 tokens
    idx, valid = pack_mask(chosen)  # rows 1 and 2 padded with unchosen positions
    out = block.add_update(x, block.router(x), idx, valid)
    assert torch.equal(out[~chosen], x[~chosen])  # padding and unchosen tokens: bit for bit
    assert not torch.isclose(out[chosen], x[chosen]).all(dim=-1).any()  # every chosen token moved


@pytest.mark.parametrize("target", [0.25, 0.75])
def test_capacity_penalty_is_the_squared_gap_and_descent_moves_the_open_share_to_the_target(target):
    scores = torch.tensor([-2.0, -0.5, 0.3, 1.0, -1.0, 0.7], requires_grad=True)  # 3 of 6 open
    gates = straight_through_gate(scores)
    penalty = capacity_penalty(gates, target)
    assert penalty.item() == pytest.approx((0.5 - target) ** 2)
    penalty.backward()
    sig = torch.sigmoid(scores.detach())
    expected = 2 * (0.5 - target) * sig * (1 - sig) / len(scores)  # straight through the gate
    torch.testing.assert_close(scores.grad, expected)
    assert (scores.grad < 0).all() == (target > 0.5)  # below target: descent raises every score
