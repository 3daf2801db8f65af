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

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def decides_in_float32(forward):
    """Runs a router's forward(self, x, ...) on float32 x with autocast off. Every routing
    decision (a threshold, a top-k, an argmax) reads these scores, and bfloat16 would round
    them: sigmoid of a score in (-0.004, 0) becomes 0.5 and opens a gate float32 keeps shut."""

    @functools.wraps(forward)
    def in_float32(self, x, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return forward(self, x.float(), *args, **kwargs)

    return in_float32


# --- Mixture-of-Depths -----------------------------------------------------------------------


class DepthRouter(nn.Linear):
    """r_i = w . x_i + b, one score per token: (B, T, d) -> (B, T).

    The paper's router is w . x_i. The bias b is the same for every token, so it never changes
    which tokens top-k picks; it shifts sigmoid(r), which scales the update and is compared with
    0.5 in causal routing, so the BCE can fit the base rate C (a logit near log(C / (1 - C)),
    -1.95 at C = 0.125) without bending w towards it."""

    def __init__(self, n_embd):
        super().__init__(n_embd, 1)

    @decides_in_float32
    def forward(self, x):
        return super().forward(x).squeeze(-1)


class CausalPredictor(nn.Sequential):
    """p(x_i), a small MLP that predicts top-k membership from token i alone: (B, T, d) -> (B, T)
    logits. It reads a detached x, so its BCE trains only its own weights."""

    def __init__(self, n_embd):
        hidden = n_embd // 8  # "small" in the paper; d/8 is about 1% of a block's weights
        super().__init__(nn.Linear(n_embd, hidden), nn.GELU(), nn.Linear(hidden, 1))

    @decides_in_float32
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
    """BCE( sigmoid(logit_i), 1[i in top-k of its row] ), logit_i the router's r_i or the
    predictor's p(x_i): teaches a per-token decision to imitate the non-causal top-k choice.
    Targets are built per row, the same rows top-k chose in."""
    return F.binary_cross_entropy_with_logits(logits, topk_mask.to(logits.dtype))


def pack_mask(mask):
    """(B, T) boolean mask -> indices (B, m) and valid (B, m), m = the largest row count.

    Row b lists its chosen positions in ascending order, then pads with unchosen ones; valid
    marks the real entries. The padding sits after every real entry, so causal attention over
    the packed sequence never lets a real token see it: no attention mask is needed. (Used by
    MoD's causal mode, MindSkip's token gates and MoM.)"""
    counts = mask.sum(dim=1, keepdim=True)  # (B, 1)
    # chosen first, each group in order
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
    m = int(counts.max())
    valid = torch.arange(m, device=mask.device) < counts
    return order[:, :m], valid


def flat_rows(positions, seq_len):
    """Positions (B, m) within each row of x (B, T, d) -> (B*m,) rows of x.view(B*T, d): how
    routed tokens are picked with one index_select, and put back with one index_copy."""
    offsets = seq_len * torch.arange(positions.size(0), device=positions.device)
    return (positions + offsets[:, None]).flatten()


class AddRows(torch.autograd.Function):
    """x.index_add_(0, index, rows) in place, for index without repeats. torch's own index_add
    keeps `rows` for its backward although the gradient needs only the index: this version keeps
    the index alone, which saves a copy of every routed update (MoD and MoM)."""

    @staticmethod
    def forward(ctx, x, index, rows):
        ctx.mark_dirty(x)
        ctx.save_for_backward(index)
        x.index_add_(0, index, rows)
        return x  # x itself: torch.compile breaks the graph on a dirty input that is not returned

    @staticmethod
    def backward(ctx, grad):
        index, = ctx.saved_tensors
        return grad, None, grad.index_select(0, index)  # x's gradient passes through untouched


def add_rows_(x, index, rows):
    """x[index[i]] += rows[i] in place (x: (N, d), index: (n,) without repeats, rows: (n, d))."""
    return AddRows.apply(x, index, rows)


# --- the other techniques' routers ------------------------------------------------------------


def straight_through_gate(logits, threshold=0.5):
    """g = 1[sigmoid(s) >= threshold] in the forward pass, d g / d s = d sigmoid(s) / d s in the
    backward pass (straight-through estimator)."""
    soft = torch.sigmoid(logits)
    hard = (soft >= threshold).to(soft.dtype)
    return hard + (soft - soft.detach())  # exactly `hard` forward; (hard + soft) - soft may not be


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

    @decides_in_float32
    def score(self, h):
        """h: (B, T, C) -> s: (B,) at sequence level, (B, T) at token level, float32."""
        if self.level == "sequence":
            h = h.mean(dim=1)
        return F.linear(h, self.weight).squeeze(-1)

    def forward(self, h, offset=0.0):
        """(g, s): g = 1[sigmoid(s + offset) >= threshold], straight-through, and the score s
        itself, detached (MindSkipGPT's offset follows it); offset: see MindSkipGPT."""
        score = self.score(h)
        return straight_through_gate(score + offset, self.threshold), score.detach()


def capacity_penalty(gates, target_capacity):
    """MindSkip's sparsity term (this project's): (mean(g) - target)^2 over every gate of the
    batch. Two-sided, so the open share is pulled to the target from above and from below;
    mean(g) is the hard share forward and gets sigmoid's gradient backward."""
    return (gates.mean() - target_capacity) ** 2


def gate_sum_sparsity(gates_per_layer):
    """The official code's sparsity term: sum over gated layers of the mean gate (its weight,
    the official gradient_scale, is --sparsity_coef, applied by train.py). It has no target: it
    pushes every gate shut, the LM loss holds them open."""
    return sum(g.mean() for g in gates_per_layer)


def switch_balance_loss(router_probs, chosen, n_choices):
    """Switch Transformer load balancing: N * sum_j f_j * P_j, with f_j the fraction of
    choices that went to option j and P_j the mean router probability of option j.
    Equals 1 for perfectly uniform routing; when every token puts all its probability on the same
    K options (K = chosen.size(-1)) it equals N / K: N for collapse onto one option with K = 1.

    router_probs: (..., N) softmax outputs; chosen: (..., K) indices of the chosen options."""
    probs = router_probs.reshape(-1, n_choices)
    counts = F.one_hot(chosen.reshape(-1), n_choices).to(probs.dtype)
    fraction = counts.mean(dim=0)  # f_j: share of all choices
    mean_prob = probs.mean(dim=0)  # P_j
    return n_choices * (fraction * mean_prob).sum()


# --- Mixture-of-Modules -------------------------------------------------------------------------

class ModuleRouter(nn.Module):
    """Mixture-of-Modules router of one pool: scores its N modules and SKIP for every token at
    assembly step h,

        gru: s_h = GRUCell(LN(x_h), s_{h-1}),  s_0 = 0      (state carries across the H steps)
        mlp: s_h = gelu(W_1 LN(x_h))                         (stateless)
        logits_h = (W_2 s_h + b + b_h) / temperature,   p_h = softmax(logits_h)

    b_h is a per-step bias, present only with --router_init layer_order, where it starts the
    router near the dense order (module h at step h); otherwise the router cannot tell steps apart
    except through its GRU state, as in the paper.
    Differences from the official code, kept on purpose: a LayerNorm on the router input (the
    official routers read the raw residual stream, whose scale grows with depth); the MLP router's
    activation is tanh-GELU (official: ReLU). The official GRU is the standard cell, as here."""

    def __init__(self, n_embd, n_choices, kind, steps, temperature=1.0, bias=True, step_bias=False):
        super().__init__()
        width = max(16, n_embd // 8)  # a router costs a few percent of a block
        self.kind, self.temperature = kind, temperature
        self.ln = nn.LayerNorm(n_embd, elementwise_affine=True, bias=bias)
        if kind == "gru":
            self.cell = nn.GRUCell(n_embd, width, bias=bias)
        else:
            self.hidden = nn.Linear(n_embd, width, bias=bias)
        self.out = nn.Linear(width, n_choices, bias=bias)
        self.step_bias = nn.Parameter(torch.zeros(steps, n_choices)) if step_bias else None

    @decides_in_float32
    def forward(self, x, state, step):
        """x: (B, T, C), state: (B*T, width) or None -> logits (B, T, n_choices), new state."""
        B, T, C = x.shape
        z = self.ln(x).reshape(B * T, C)
        if self.kind == "gru":
            state = hidden = self.cell(z, state)  # None starts from zeros
        else:
            hidden = F.gelu(self.hidden(z), approximate="tanh")
        logits = self.out(hidden)
        if self.step_bias is not None:
            logits = logits + self.step_bias[step]
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits.view(B, T, -1), state

    @torch.no_grad()
    def start_in_layer_order(self, targets, prob=0.9):
        """Per-step bias so that step h gives probability about `prob` to module targets[h]
        (the rest spread evenly): log(prob / (1 - prob) * (n_choices - 1)) on the target."""
        n = self.step_bias.size(1)
        self.step_bias.zero_()
        for h, m in enumerate(targets):
            # times temperature: the forward divides the logits by it
            self.step_bias[h, m] = math.log(prob / (1 - prob) * (n - 1)) * self.temperature

    def matmul_params(self):
        return sum(p.numel() for name, p in self.named_parameters()
                   if p.dim() == 2 and name != "step_bias")


# --- Mixture-of-Modules: choices in module order -----------------------------------------
# A choice is one (token, rank k) pair, numbered (b * T + t) * K + k. Sorting the non-SKIP
# choices by module puts each module's tokens side by side: one gather feeds every module.

def sort_choices_by_module(chosen, n_modules):
    """chosen (B, T, K) module ids -> the non-SKIP choices (S,) sorted by module (one argsort)
    and how many each module got (Python ints)."""
    ids = chosen.reshape(-1)
    order = ids.argsort(stable=True)  # SKIP (= n_modules) sorts last
    counts = torch.bincount(ids, minlength=n_modules + 1)[:n_modules].tolist()
    return order[:sum(counts)], counts


def by_module(pool, rows, counts, fn):
    """fn(module, its contiguous slice of rows) for every chosen module, concatenated in module
    order. One split, whose backward joins the slices' gradients with one cat (indexing would
    write each module's gradient into a zero tensor of all the rows)."""
    outs = [fn(module, part) for module, part in zip(pool, rows.split(counts)) if len(part)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def add_by_module(x, pool, rows, counts, probs, chosen, choices, fn):
    """x + sum_k p_jk * fn(module of choice k of token j), SKIP adding nothing: each module runs
    on its slice of rows (module order) and add_rows_ adds its weighted outputs at its tokens,
    all into one copy of x, whose gradient passes through untouched."""
    K = chosen.size(-1)
    weight = probs.gather(-1, chosen).reshape(-1).index_select(0, choices)[:, None]
    new_x = x.reshape(-1, x.size(-1)).clone()
    token = choices // K
    parts = zip(pool, rows.split(counts), weight.split(counts), token.split(counts))
    for module, part, p, at in parts:
        if len(part):  # add_rows_: a module's tokens never repeat
            add_rows_(new_x, at, (p * fn(module, part)).to(x.dtype))
    return new_x.view_as(x)


def to_token_order(rows, chosen, choices):
    """Rows in module order (S, D) -> (B, T, K, D) by token and rank, zeros for SKIP."""
    B, T, K = chosen.shape
    full = rows.new_zeros(B * T * K, rows.size(-1)).index_copy(0, choices, rows)
    return full.view(B, T, K, -1)
