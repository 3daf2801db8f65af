"""
Routing math shared by Mixture-of-Depths, Mixture-of-Modules and MindSkip.

Each function is a few lines and computes the formula in its docstring; the technique files
decide where to call them.
"""

import torch
import torch.nn.functional as F


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


def pack_mask(mask):
    """(B, T) boolean mask -> indices (B, m) and valid (B, m), m = the largest row count.

    Row b lists its chosen positions in ascending order, then pads with unchosen ones; valid
    marks the real entries. The padding sits after every real entry, so causal attention over
    the packed sequence never lets a real token see it: no attention mask is needed."""
    counts = mask.sum(dim=1, keepdim=True)  # (B, 1)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # chosen first, each group in order
    m = int(counts.max())
    valid = torch.arange(m, device=mask.device) < counts
    return order[:, :m], valid


def threshold_route(logits, threshold=0.5):
    """Causal routing: token i is routed iff sigmoid(logit_i) > threshold. Decided from token
    i alone, so it never looks at the future."""
    return torch.sigmoid(logits) > threshold


def topk_bce_loss(logits, topk_mask):
    """BCE( sigmoid(r_i), 1[i in top-k of its row] ): teaches a per-token decision to imitate
    the non-causal top-k choice. Targets are built per row, the same rows top-k chose in."""
    return F.binary_cross_entropy_with_logits(logits, topk_mask.to(logits.dtype))


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
