"""
Mixture-of-Modules (Gong et al. 2024, arXiv 2407.06677).

The layers of a transformer become two pools: attention modules A_1..A_N (ln_1 + attention)
and FFN modules F_1..F_M (ln_2 + MLP), each pool with one more, parameter-free choice, SKIP.
Two routers (one per pool, router.ModuleRouter) assemble a network per token over H steps. At
step h each token picks its top-K choices from each pool, with p the router's softmax:

    x_j <- x_j + sum_{m in topK(p^A_j), m != SKIP} p^A_jm * A_m(x)_j     attention assembly
    x_j <- x_j + sum_{m in topK(p^F_j), m != SKIP} p^F_jm * F_m(x_j)      FFN assembly

(MoMChunk.assembly_step, line for line.) Weights are the softmax probabilities, not
renormalised over the top-K: at K = 1 a renormalised weight is always 1 and gets no gradient.

A_m(x)_j (--attn_assembly): per_module (default): token j's q, k, v come from the module it
chose; the k-th choices of all tokens form assembly k, one causal attention over its non-SKIP
tokens (a SKIP token is unchanged and no key). official (the authors' code): a token's q/k/v is
the sum of its chosen modules'; SKIP is a zero key and value. Equal at K = 1 without SKIP.

Layout: `bottom_layers` dense blocks, `chunks` routed chunks (each with its own pools, routers,
H steps and, when chunks > 1, a dense anchor block after it), `top_layers` dense blocks. The
balance loss is Switch's, SKIP a class. Routing reads token j alone: causal by construction.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from model import (GPT, MLP, Block, CausalSelfAttention, KVCache, LayerNorm, RowKVCache,
                   attention_flops, block_matmul_params, causal_attention, copy_weights)
from router import (ModuleRouter, add_by_module, by_module, pack_mask, sort_choices_by_module,
                    switch_balance_loss, to_token_order)


@dataclass
class MoMConfig:
    n_attn_modules: int = 0  # attention modules per chunk's pool; 0 = the chunk's dense layers
    n_ffn_modules: int = 0  # FFN modules per chunk's pool; 0 = the chunk's dense layers
    assembly_steps: int = 0  # H, assembly steps per chunk; 0 = the chunk's dense layers
    modules_per_step: int = 1  # K, choices per token per step from each pool (SKIP included)
    router_kind: str = "gru"  # "gru": state carries across the H steps (paper) | "mlp": stateless
    router_temperature: float = 1.0  # softmax temperature of the routers (official scripts: 0.2)
    router_init: str = "fresh"  # "fresh" (the paper) | "layer_order": start near module h at h
    balance_coef: float = 0.01  # weight of the Switch load-balancing loss
    balance_over: str = "pool"  # "pool": f, P over all steps of a pool (official) | "steps"
    attn_assembly: str = "per_module"  # "per_module" (K attentions) | "official" (summed q/k/v)
    bottom_layers: int = 0  # dense blocks kept below the routed part
    top_layers: int = 0  # dense blocks kept above it
    chunks: int = 1  # routed chunks, each with its own pools, routers, steps (anchor if > 1)

    def __post_init__(self):
        minimum = dict(n_attn_modules=0, n_ffn_modules=0, assembly_steps=0, bottom_layers=0,
                       top_layers=0, chunks=1, modules_per_step=1)
        for flag, least in minimum.items():
            if getattr(self, flag) < least:
                raise ValueError(f"--{flag} must be >= {least}, got {getattr(self, flag)}")
        for flag in ("n_attn_modules", "n_ffn_modules"):
            pool = getattr(self, flag)
            if pool and self.modules_per_step > pool + 1:
                raise ValueError(f"--modules_per_step ({self.modules_per_step}) cannot exceed "
                                 f"--{flag} + 1 (the pool plus SKIP = {pool + 1})")
        choices = dict(router_kind=("mlp", "gru"), router_init=("fresh", "layer_order"),
                       balance_over=("pool", "steps"), attn_assembly=("per_module", "official"))
        for flag, allowed in choices.items():
            if getattr(self, flag) not in allowed:
                raise ValueError(f"--{flag} must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, flag)!r}")
        if not self.router_temperature > 0:
            raise ValueError(f"--router_temperature must be > 0, got {self.router_temperature}")
        if self.balance_coef < 0:
            raise ValueError(f"--balance_coef must be >= 0, got {self.balance_coef}")

    def layers_per_chunk(self, n_layer):
        """The dense layers each chunk stands for, once n_layer is known (ValueError otherwise)."""
        anchors = self.chunks if self.chunks > 1 else 0
        routed = n_layer - self.bottom_layers - self.top_layers - anchors
        if routed < self.chunks or routed % self.chunks:
            raise ValueError(f"--chunks {self.chunks} must divide the {routed} routed layers left "
                             f"of n_layer {n_layer} by --bottom_layers {self.bottom_layers}, "
                             f"--top_layers {self.top_layers} and {anchors} anchor layers, into "
                             f"chunks of at least one layer")
        return routed // self.chunks


def add_all(x, terms):
    """x + (t_1 + t_2 + ...), x itself if none (one token's weighted module outputs at decode)."""
    return x + sum(terms[1:], terms[0]) if terms else x


# --- the attention of each assembly, module order in and out -------------------------------
def attend_per_module(qkv, chosen, choices, n_modules, n_head, dropout_p=0.0):
    """per_module, no cache: chosen (B, T, K) holds module ids (n_modules = SKIP), choices (S,)
    the choice numbers (b*T+t)*K+k sorted by module (router.sort_choices_by_module). Assembly k
    of batch row b (attention row k * B + b) is the causal sequence of row b's non-SKIP k-th
    choices, gathered from qkv (module order) into packed rows and back: two gathers, no zeros."""
    B, T, K = chosen.shape
    S, device = choices.numel(), choices.device
    kept = (chosen != n_modules).permute(2, 0, 1).reshape(K * B, T)
    position, valid = pack_mask(kept)  # (K*B, n): each row's kept positions, then padding
    row = torch.arange(K * B, device=device)[:, None]
    choice = ((row % B) * T + position) * K + row // B  # the choice each packed entry holds
    place = torch.zeros(B * T * K, dtype=torch.long, device=device).index_copy_(
        0, choices, torch.arange(S, device=device))  # each choice's place in module order
    source = torch.where(valid, place[choice], 0)  # padding reads row 0: it follows valid ones
    packed = qkv.index_select(0, source.flatten()).view(*source.shape, -1)
    y = causal_attention(packed, n_head, dropout_p=dropout_p)  # (K*B, n, C)
    entry = torch.arange(source.numel(), device=device)[valid.flatten()]
    back = torch.empty(S, dtype=torch.long, device=device).index_copy_(0, source[valid], entry)
    return y.reshape(-1, y.size(-1)).index_select(0, back)  # module order again


def attend_official(qkv, chosen, choices, n_head, cache=None, dropout_p=0.0):
    """official: q/k/v summed over a token's chosen modules (SKIP: a zero key and value), one
    causal attention over all tokens; each choice reads its token's output."""
    B, T, K = chosen.shape
    y = causal_attention(to_token_order(qkv, chosen, choices).sum(2), n_head, cache, dropout_p)
    return y.reshape(B * T, -1)[choices // K]


def attend_kept_tokens(qkv, kept, n_head, cache):
    """Generation: row r's kept tokens (kept: (N, T) bool) of qkv (N, T, 3C) join cache.row(r)
    and attend to it and causally to each other; a token not kept neither asks nor is a key."""
    N, T, C3 = qkv.shape
    out = qkv.new_zeros(N, T, C3 // 3)
    for r, row_kept in enumerate(kept.tolist()):
        if all(row_kept):  # the common case at decode: the row's token chose a module
            out[r] = causal_attention(qkv[r:r + 1], n_head, cache.row(r))[0]
        elif any(row_kept):
            index = torch.tensor([t for t, k in enumerate(row_kept) if k], device=qkv.device)
            out[r, index] = causal_attention(qkv[r:r + 1, index], n_head, cache.row(r))[0]
    return out


def attend_per_module_cached(qkv, chosen, choices, n_modules, n_head, cache):
    """per_module with a cache (a RowKVCache): each assembly row k * B + b appends its non-SKIP
    tokens to its own row of the cache."""
    B, T, K = chosen.shape
    rows = to_token_order(qkv, chosen, choices).permute(2, 0, 1, 3).reshape(K * B, T, -1)
    kept = (chosen != n_modules).permute(2, 0, 1).reshape(K * B, T)
    y = attend_kept_tokens(rows, kept, n_head, cache)  # (K*B, T, C)
    return y.view(K, B, T, -1).permute(1, 2, 0, 3).reshape(B * T * K, -1)[choices]


class MoMCache:
    """One KVCache per dense block (bottom, anchors, top); per chunk and step, a RowKVCache over
    the assembly rows k * B + b (per_module) or a KVCache over the batch (official)."""

    def __init__(self, bottom, chunks, top, steps, assembly):
        self.bottom, self.anchors, self.top = ([KVCache() for _ in range(n)]
                                               for n in (bottom, chunks, top))
        step_cache = RowKVCache if assembly == "per_module" else KVCache
        self.steps = [[step_cache() for _ in range(steps)] for _ in range(chunks)]

    def nbytes(self):
        steps = [c for chunk in self.steps for c in chunk]
        return sum(c.nbytes() for c in (*self.bottom, *self.anchors, *self.top, *steps))


class MoMChunk(nn.Module):
    """Two pools, their routers and H assembly steps (then an optional dense anchor block)."""

    def __init__(self, config, settings, n_attn, n_ffn, steps, anchor):
        super().__init__()
        self.config, self.steps = config, steps
        self.K, self.assembly = settings.modules_per_step, settings.attn_assembly
        d, bias = config.n_embd, config.bias
        self.attn_pool = nn.ModuleList(nn.ModuleDict(dict(
            ln_1=LayerNorm(d, bias), attn=CausalSelfAttention(config))) for _ in range(n_attn))
        self.ffn_pool = nn.ModuleList(nn.ModuleDict(dict(
            ln_2=LayerNorm(d, bias), mlp=MLP(config))) for _ in range(n_ffn))
        layer_order = settings.router_init == "layer_order"
        self.attn_router, self.ffn_router = (  # last choice: SKIP
            ModuleRouter(config.n_embd, n + 1, settings.router_kind, steps,
                         settings.router_temperature, config.bias, step_bias=layer_order)
            for n in (n_attn, n_ffn))
        self.anchor = Block(config) if anchor else None

    def route(self, router, x, state, h):
        """p (B, T, N + 1) and its top-K (B, T, K), ranked: assembly k takes the k-th choice."""
        logits, state = router(x, state, h)
        probs = logits.softmax(dim=-1)
        return probs, probs.topk(self.K, dim=-1).indices, state

    def forward(self, x, cache=None, anchor_cache=None):
        """H assembly steps, then the anchor: (x, routing record; None at decode). cache: None,
        or this chunk's per-step caches from MoMCache.steps."""
        if cache is not None and x.shape[:2] == (1, 1):
            x, record = self.decode_one_token(x, cache), None
        else:
            x, record = self.assemble(x, cache)
        return (x if self.anchor is None else self.anchor(x, anchor_cache)), record

    def assemble(self, x, cache=None):
        """assembly_step for h = 0..H-1, which updates the routers' GRU states in `states`;
        the record holds every step's probabilities and choices, (H, B, T, ...)."""
        states = [None, None]  # attention router's, FFN router's
        record = {"attn_probs": [], "attn": [], "ffn_probs": [], "ffn": []}
        for h in range(self.steps):
            x, routing = self.assembly_step(x, h, states, None if cache is None else cache[h])
            for name, value in zip(record, routing):
                record[name].append(value)
        return x, {name: torch.stack(values) for name, values in record.items()}

    def assembly_step(self, x, h, states, cache=None):
        """The module docstring's two equations at step h."""
        p_a, top_a, states[0] = self.route(self.attn_router, x, states[0], h)  # p^A, topK(p^A)
        x = self.attention_assembly(x, p_a, top_a, cache)  # x + sum p^A_jm A_m(x)_j
        p_f, top_f, states[1] = self.route(self.ffn_router, x, states[1], h)  # p^F, topK(p^F)
        x = self.ffn_assembly(x, p_f, top_f)  # x + sum p^F_jm F_m(x_j)
        return x, (p_a, top_a, p_f, top_f)

    def attention_assembly(self, x, probs, chosen, cache=None):
        """x_j + sum_k p_jk * A_{m_jk}(x)_j. q/k/v of different tokens come from different
        modules, so no module runs whole: each computes q/k/v for its tokens (module order),
        the assembly's attention runs, then each module projects its tokens' outputs."""
        B, T, C = x.shape
        N, n_head = len(self.attn_pool), self.config.n_head
        choices, counts = sort_choices_by_module(chosen, N)
        if choices.numel() == 0:  # every token chose SKIP
            if cache is not None and self.assembly == "official":  # still a zero key and value
                causal_attention(x.new_zeros(B, T, 3 * C), n_head, cache)
            return x
        rows = x.reshape(B * T, C).index_select(0, choices // self.K)  # by module
        qkv = by_module(self.attn_pool, rows, counts, lambda m, part: m.attn.c_attn(m.ln_1(part)))
        dropout_p = self.config.dropout if self.training else 0.0
        if self.assembly == "official":
            y = attend_official(qkv, chosen, choices, n_head, cache, dropout_p)
        elif cache is None:
            y = attend_per_module(qkv, chosen, choices, N, n_head, dropout_p)
        else:
            y = attend_per_module_cached(qkv, chosen, choices, N, n_head, cache)
        return add_by_module(x, self.attn_pool, y, counts, probs, chosen, choices,
                             lambda m, part: m.attn.resid_dropout(m.attn.c_proj(part)))

    def ffn_assembly(self, x, probs, chosen):
        """x_j + sum_k p_jk * F_{m_jk}(x_j): each module runs once, on its slice of tokens."""
        B, T, C = x.shape
        choices, counts = sort_choices_by_module(chosen, len(self.ffn_pool))
        if choices.numel() == 0:
            return x
        rows = x.reshape(B * T, C).index_select(0, choices // self.K)
        return add_by_module(x, self.ffn_pool, rows, counts, probs, chosen, choices,
                             lambda m, part: m.mlp(m.ln_2(part)))

    # --- decode: one token of one sequence ----------------------------------------------------

    def decode_one_token(self, x, cache):
        """assemble for one token with a cache, as plain module calls on Python numbers: at
        decode every op is its own small kernel, so the sort, gathers and scatters of the
        general path would cost more than the modules."""
        states = [None, None]
        for h in range(self.steps):
            p, top, states[0] = self.route(self.attn_router, x, states[0], h)
            p, top = p.tolist()[0][0], top.tolist()[0][0]
            if self.assembly == "official":
                x = self.one_token_official_attention(x, p, top, cache[h])
            else:
                x = self.one_token_per_module_attention(x, p, top, cache[h])
            p, top, states[1] = self.route(self.ffn_router, x, states[1], h)
            p, top = p.tolist()[0][0], top.tolist()[0][0]
            x = add_all(x, [p[m] * self.ffn_pool[m].mlp(self.ffn_pool[m].ln_2(x))
                            for m in top if m < len(self.ffn_pool)])  # SKIP adds nothing
        return x

    def one_token_per_module_attention(self, x, probs, chosen, cache):
        """x + sum_k p_k A_{m_k}(x): choice k attends with its module's q/k/v over cache.row(k)
        (decoding runs B = 1, so assembly row k * B + b is k); a SKIP writes nothing."""
        def attend(k, module):
            qkv = module.attn.c_attn(module.ln_1(x))
            return module.attn.c_proj(causal_attention(qkv, self.config.n_head, cache.row(k)))
        return add_all(x, [probs[m] * attend(k, self.attn_pool[m])
                           for k, m in enumerate(chosen) if m < len(self.attn_pool)])

    def one_token_official_attention(self, x, probs, chosen, cache):
        """x + sum_k p_k c_proj_{m_k}(attention of the summed q/k/v) (all SKIP: a zero key)."""
        modules = [(self.attn_pool[m], probs[m]) for m in chosen if m < len(self.attn_pool)]
        qkv = add_all(x.new_zeros(*x.shape[:2], 3 * x.size(-1)),
                      [m.attn.c_attn(m.ln_1(x)) for m, _ in modules])
        y = causal_attention(qkv, self.config.n_head, cache)
        return add_all(x, [p * m.attn.c_proj(y) for m, p in modules])


class MoMGPT(GPT):
    ddp_find_unused_parameters = True  # a module no token chose in a step gets no gradient

    def __init__(self, config, settings):
        super().__init__(config)
        P = settings.layers_per_chunk(config.n_layer)
        s = self.settings = replace(  # replace() validates again
            settings, n_attn_modules=settings.n_attn_modules or P,
            n_ffn_modules=settings.n_ffn_modules or P, assembly_steps=settings.assembly_steps or P)
        self.loss_weights = {"mom_balance": s.balance_coef}
        self.bottom = nn.ModuleList(Block(config) for _ in range(s.bottom_layers))
        self.chunks = nn.ModuleList(
            MoMChunk(config, s, s.n_attn_modules, s.n_ffn_modules, s.assembly_steps,
                     anchor=s.chunks > 1) for _ in range(s.chunks))
        self.top = nn.ModuleList(Block(config) for _ in range(s.top_layers))
        self.n_dense = s.bottom_layers + s.top_layers + (s.chunks if s.chunks > 1 else 0)
        for part in (self.bottom, self.chunks, self.top):
            part.apply(self._init_weights)
        updates = 2 * (self.n_dense + s.chunks * s.assembly_steps)  # residual updates per token
        for name, p in self.named_parameters():  # GPT-2's depth scaling
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / updates ** 0.5)
        if s.router_init == "layer_order":  # step h's target: the module standing for its layer
            for chunk in self.chunks:
                for router, n in ((chunk.attn_router, s.n_attn_modules),
                                  (chunk.ffn_router, s.n_ffn_modules)):
                    router.start_in_layer_order([h * n // s.assembly_steps
                                                 for h in range(s.assembly_steps)])
        self.last_routing = None  # per chunk: choices (H, B, T, K) of each pool

    def make_blocks(self, config):
        """No blocks: the trunk is dense and routed chunks (bottom, chunks, top), made above."""
        return nn.ModuleList()

    def forward_trunk(self, x, cache=None):
        def part(name, i):  # this part's cache, or None without one
            return None if cache is None else getattr(cache, name)[i]

        for i, block in enumerate(self.bottom):
            x = block(x, part("bottom", i))
        routing = []
        for c, chunk in enumerate(self.chunks):
            x, record = chunk(x, part("steps", c), part("anchors", c))
            routing.append(record)
        for i, block in enumerate(self.top):
            x = block(x, part("top", i))
        if cache is not None:  # generation: no losses (and decode_one_token keeps no record)
            return x, {}
        self.last_routing = [{k: v.detach() for k, v in r.items() if not k.endswith("probs")}
                             for r in routing]
        return x, {"mom_balance": self.balance_loss(routing)}

    def balance_loss(self, routing):
        """Mean Switch loss over every pool of every chunk (and step, with balance_over=steps)."""
        terms = []
        for record in routing:
            for pool in ("attn", "ffn"):
                probs, chosen = record[f"{pool}_probs"], record[pool]
                if self.settings.balance_over == "pool":
                    terms.append(switch_balance_loss(probs, chosen, probs.size(-1)))
                else:
                    terms += [switch_balance_loss(p, c, p.size(-1)) for p, c in zip(probs, chosen)]
        return torch.stack(terms).mean()

    def new_cache(self):
        s = self.settings
        return MoMCache(s.bottom_layers, s.chunks, s.top_layers, s.assembly_steps, s.attn_assembly)

    def kept(self, record):
        """(attention, FFN) masks (H, B, T, K) of the choices that took a real module."""
        chunk = self.chunks[0]
        return record["attn"] != len(chunk.attn_pool), record["ffn"] != len(chunk.ffn_pool)

    @torch.no_grad()
    def evaluate(self, idx, targets):
        _, loss, aux = self(idx, targets)
        kept = [torch.cat([self.kept(r)[pool].flatten() for r in self.last_routing])
                for pool in (0, 1)]
        attn_kept, ffn_kept = (k.float().mean().item() for k in kept)
        return {
            "loss": loss.item(),
            "mom_balance": aux["mom_balance"].item(),
            "modules_used": self.settings.modules_per_step * (attn_kept + ffn_kept) / 2,
            "skip_rate": 1 - (attn_kept + ffn_kept) / 2,
            "attn_skip_rate": 1 - attn_kept, "ffn_skip_rate": 1 - ffn_kept,
            "flops_per_token": self.routing_flops_per_token(self.last_routing),
        }

    @torch.no_grad()
    def depth_per_token(self, idx, prompt_len):
        """(B, T) share of the token's sublayer slots (2 per dense block, 2HK per chunk) that ran
        a real module (1 = no SKIP anywhere). Routing is causal, so a full forward tells what
        decoding used within one context window; longer text is read in block_size windows."""
        s = self.settings
        slots = 2 * self.n_dense + 2 * s.chunks * s.assembly_steps * s.modules_per_step
        depths = []
        for window in self.context_windows(idx):
            self(window)
            used = 2 * self.n_dense + sum((a.sum(dim=(0, 3)) + f.sum(dim=(0, 3)))
                                          for a, f in map(self.kept, self.last_routing))
            depths.append(used.float().cpu() / slots)
        return torch.cat(depths, dim=1)

    # --- cost ----------------------------------------------------------------------------

    def routing_flops_per_token(self, routing):
        """Training FLOPs per token of a realised routing: a token pays the matmuls of each real
        module it chose; per_module, in assembly (h, k) of a row with n non-SKIP tokens each
        attends over n keys; official, every token over all T every step. Both routers run for
        every token at every step; dense blocks cost what they cost in GPT."""
        B, T = routing[0]["attn"].shape[1:3]
        d = self.config.n_embd
        attn_params = block_matmul_params(d) // 3  # c_attn 3d^2 + c_proj d^2; the MLP: 8d^2
        ffn_params = block_matmul_params(d) - attn_params
        total = self.n_dense * (6 * block_matmul_params(d) + attention_flops(d, T)) * B * T
        for chunk, record in zip(self.chunks, routing):
            attn_kept, ffn_kept = self.kept(record)
            total += 6 * (attn_params * attn_kept.sum().item() + ffn_params * ffn_kept.sum().item())
            if chunk.assembly == "official":
                total += attention_flops(d, T) * chunk.steps * B * T
            else:
                total += attention_flops(d, 1) * (attn_kept.sum(dim=2).double() ** 2).sum().item()
            routers = chunk.attn_router.matmul_params() + chunk.ffn_router.matmul_params()
            total += 6 * chunk.steps * routers * B * T
        return total / (B * T) + 6 * d * self.config.vocab_size

    def step_flops_per_token(self, seq_len=None):
        """The routing the last forward took: untrained routers send some tokens to SKIP, so the
        no-SKIP ceiling would understate what a perfect implementation could reach."""
        return self.routing_flops_per_token(self.last_routing)

    def flops_per_token(self, seq_len=None):
        """The ceiling: every token takes K real modules from both pools at every step (no SKIP).
        evaluate() reports the realised figure of the routing it saw."""
        T = seq_len or self.config.block_size
        s = self.settings
        module_0 = torch.zeros(s.assembly_steps, 1, T, s.modules_per_step, dtype=torch.long)
        return self.routing_flops_per_token([{"attn": module_0, "ffn": module_0}] * s.chunks)

    # --- two-stage training ----------------------------------------------------------------

    @classmethod
    def from_dense(cls, dense, settings):
        """Stage 2. Dense layers in order: bottom_layers, per chunk its P routed layers (and its
        anchor), top_layers. A pool of n modules takes the chunk's layers i * P // n, i < n:
        evenly spaced from the first (the official layer map takes the first n). Dense blocks,
        embeddings, ln_f and head are copied; routers start fresh."""
        P = settings.layers_per_chunk(dense.config.n_layer)
        for flag in ("n_attn_modules", "n_ffn_modules"):
            if getattr(settings, flag) > P:
                raise ValueError(f"--{flag} ({getattr(settings, flag)}) exceeds the {P} dense "
                                 f"layers per chunk that can fill the pool")
        model = cls(replace(dense.config), settings)
        layers = iter(dense.transformer.h)
        pairs = list(zip(model.embeddings_and_head(), dense.embeddings_and_head()))
        pairs += [(block, next(layers)) for block in model.bottom]
        for chunk in model.chunks:
            chunk_layers = [next(layers) for _ in range(P)]
            # a pool module's parts are named as the Block's (ln_1, attn / ln_2, mlp)
            pairs += [(sub, getattr(chunk_layers[i * P // len(pool)], part))
                      for pool in (chunk.attn_pool, chunk.ffn_pool)
                      for i, module in enumerate(pool) for part, sub in module.items()]
            if chunk.anchor is not None:
                pairs.append((chunk.anchor, next(layers)))
        pairs += [(block, next(layers)) for block in model.top]
        copy_weights(pairs)
        return model
