"""
Every router of the project, side by side: what each scores, how it decides, and the loss that
trains it. The technique files (mod.py, mom.py, mindskip.py) call these and keep the block logic.

Mixture-of-Depths (Raposo et al. 2024): one scalar per token, expert choice per sequence.

    r_i = w . x_i + b                           DepthRouter (the paper has no b: see below)
    routed = top-k of r over each sequence, k = round(C T), sorted by position
    causal decision: sigmoid(r_i) > 0.5, or sigmoid(p(stop_grad(x_i))) > 0.5 with a predictor p
    loss: BCE(causal logit_i, 1[i in top-k of its sequence])

Top-k over the sequence reads later tokens, so generation decides token by token; the BCE
teaches the per-token decision to imitate top-k, either on the router itself (its logit is r)
or on a separate predictor whose input is detached, so that it cannot change the LM objective.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# --- Mixture-of-Depths -----------------------------------------------------------------------


class DepthRouter(nn.Linear):
    """r_i = w . x_i + b, one score per token: (B, T, d) -> (B, T).

    The paper's router is w . x_i. The bias b is the same for every token, so it never changes
    which tokens top-k picks; it shifts sigmoid(r), which scales the update and is compared with
    0.5 in causal routing, so the BCE can fit the base rate C (a logit near log(C / (1 - C)),
    -1.95 at C = 0.125) without bending w towards it."""

    def __init__(self, n_embd):
        super().__init__(n_embd, 1)

    def forward(self, x):
        return super().forward(x).squeeze(-1)


class CausalPredictor(nn.Sequential):
    """p(x_i), a small MLP that predicts top-k membership from token i alone: (B, T, d) -> (B, T)
    logits. It reads a detached x, so its BCE trains only its own weights."""

    def __init__(self, n_embd):
        hidden = n_embd // 8  # "small" in the paper; d/8 is about 1% of a block's weights
        super().__init__(nn.Linear(n_embd, hidden), nn.GELU(), nn.Linear(hidden, 1))

    def forward(self, x):
        return super().forward(x.detach()).squeeze(-1)


def capacity_to_k(capacity, seq_len):
    """k = round(C * T), at least 1: a Python int, so every shape stays static."""
    return max(1, round(capacity * seq_len))


def expert_choice_topk(scores, k):
    """Expert choice per sequence: the k positions with the largest score in each row.

    scores: (B, T) -> indices (B, k), sorted ascending so the routed sub-sequence keeps
    causal order."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def indices_to_mask(indices, seq_len):
    """(B, k) positions -> (B, T) boolean mask, True where a position was chosen."""
    mask = torch.zeros(indices.size(0), seq_len, dtype=torch.bool, device=indices.device)
    return mask.scatter_(1, indices, True)


def threshold_route(logits, threshold=0.5):
    """Causal routing: token i is routed iff sigmoid(logit_i) > threshold. Decided from token
    i alone, so it never looks at the future."""
    return torch.sigmoid(logits) > threshold


def topk_bce_loss(logits, topk_mask):
    """BCE( sigmoid(r_i), 1[i in top-k of its row] ): teaches a per-token decision to imitate
    the non-causal top-k choice. Targets are built per row, the same rows top-k chose in."""
    return F.binary_cross_entropy_with_logits(logits, topk_mask.to(logits.dtype))


def pack_mask(mask):
    """(B, T) boolean mask -> indices (B, m) and valid (B, m), m = the largest row count.

    Row b lists its chosen positions in ascending order, then pads with unchosen ones; valid
    marks the real entries. The padding sits after every real entry, so causal attention over
    the packed sequence never lets a real token see it: no attention mask is needed. (Used by
    MoD's causal mode and by MoM.)"""
    counts = mask.sum(dim=1, keepdim=True)  # (B, 1)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # chosen first, each group in order
    m = int(counts.max())
    valid = torch.arange(m, device=mask.device) < counts
    return order[:, :m], valid


# --- the other techniques' routers ------------------------------------------------------------


def straight_through_gate(logits, threshold=0.5):
    """g = 1[sigmoid(s) >= threshold] in the forward pass, d g / d s = d sigmoid(s) / d s in the
    backward pass (straight-through estimator)."""
    soft = torch.sigmoid(logits)
    hard = (soft >= threshold).to(soft.dtype)
    return hard + (soft - soft.detach())  # exactly `hard` forward; (hard + soft) - soft can be off by an ulp


def capacity_hinge(gates, target_capacity):
    """Sparsity term relu(mean(g) - target) (lambda is its loss weight): zero once at most `target_capacity`
    of the gated sublayers stay open, so the LM loss alone decides below the target."""
    return F.relu(gates.mean() - target_capacity)


def switch_balance_loss(router_probs, chosen, n_choices):
    """Switch Transformer load balancing: N * sum_j f_j * P_j, with f_j the fraction of
    choices that went to option j and P_j the mean router probability of option j.
    Equals 1 for perfectly uniform routing and N when every token picks one option.

    router_probs: (..., N) softmax outputs; chosen: (..., K) indices of the chosen options."""
    probs = router_probs.reshape(-1, n_choices)
    counts = F.one_hot(chosen.reshape(-1), n_choices).to(probs.dtype)
    fraction = counts.mean(dim=0)  # f_j: share of all choices
    mean_prob = probs.mean(dim=0)  # P_j
    return n_choices * (fraction * mean_prob).sum()
