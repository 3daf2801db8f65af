"""
Routing math shared by Mixture-of-Depths, Mixture-of-Modules and MindSkip.

Each function is a few lines and computes the formula in its docstring; the technique files
decide where to call them.
"""

import torch
import torch.nn as nn
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


class MindSkipGate(nn.Module):
    """MindSkip's gate (Router-Tuning, He et al. 2024), one per gated layer:

        s = w . mean_t h_t       sequence level: one gate per sequence (the paper)
        s_t = w . h_t            token level: one gate per token (causal)
        g = 1[sigmoid(s) >= threshold]   forward;  dg/ds = sigmoid'(s) backward (straight-through)

    h is the LayerNorm output the gated sublayer reads. w has no bias and starts at zero, so
    sigmoid(0) = 0.5 opens every gate: tuning starts from the dense model. The weight keeps
    nn.Linear(d, 1)'s shape and name, so router checkpoints stay loadable."""

    def __init__(self, n_embd, level="sequence", threshold=0.5):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, n_embd))
        self.level, self.threshold = level, threshold

    def forward(self, h):
        """h: (B, T, C) -> g: (B,) at sequence level, (B, T) at token level, float32."""
        if self.level == "sequence":
            h = h.mean(dim=1)
        # scored and compared in float32: under bfloat16, sigmoid of a score in about
        # (-0.004, 0) rounds up to 0.5 and would open a gate that float32 keeps closed
        with torch.autocast(h.device.type, enabled=False):
            score = F.linear(h.float(), self.weight.float()).squeeze(-1)
        return straight_through_gate(score, self.threshold)


def capacity_penalty(gates, target_capacity):
    """MindSkip's sparsity term (this project's): (mean(g) - target)^2 over every gate of the
    batch. Two-sided, so the open share is pulled to the target from above and from below;
    mean(g) is the hard share forward and gets sigmoid's gradient backward."""
    return (gates.mean() - target_capacity) ** 2


def gate_sum_sparsity(gates_per_layer):
    """The official code's sparsity term: sum over gated layers of the mean gate (weighted by
    its gradient_scale). It has no target: it pushes every gate shut, the LM loss holds them open."""
    return sum(g.mean() for g in gates_per_layer)


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
