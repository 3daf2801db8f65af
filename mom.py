"""
Mixture-of-Modules (Gong et al. 2024, arXiv 2407.06677).

The layers of a transformer become two pools: attention modules A_1..A_N (ln_1 + attention)
and FFN modules F_1..F_M (ln_2 + MLP), each pool with one more, parameter-free choice, SKIP.
Two routers (one per pool, router.ModuleRouter) assemble a network per token over H steps. At
step h each token picks its top-K choices from each pool, with p the router's softmax:

    x_j <- x_j + sum_{m in topK(p^A_j), m != SKIP} p^A_jm * A_m(x)_j     attention assembly
    x_j <- x_j + sum_{m in topK(p^F_j), m != SKIP} p^F_jm * F_m(x_j)      FFN assembly

The weights are the softmax probabilities themselves, not renormalised over the top-K (Switch
style): with K = 1 a renormalised weight would always be 1 and the router would get no gradient
from the language-model loss. (The official code renormalises its softmax router's top-K.)

Attention A_m(x)_j, two assemblies (--attn_assembly):
- per_module (default): token j's query, key and value come from the module token j chose; one
  causal attention runs over the tokens that did not choose SKIP; each token's output goes through
  its own module's output projection. A SKIP token is unchanged and is not a key. With K > 1 the
  k-th choices of all tokens form assembly k (its own attention over its own non-SKIP tokens), so
  every query meets keys made by single modules, as in the dense model.
- official: as the official code, a token's q/k/v is the sum over its chosen modules' q/k/v;
  one attention runs over all tokens, a SKIP token being a zero key and value that still takes
  softmax mass; each chosen module's output projection is added with its weight.
With K = 1 and no SKIP the two are the same computation.

Layout (the official code's): `bottom_layers` dense blocks, then `chunks` routed chunks, each
with its own pools, router pair and H steps (and, when chunks > 1, a dense anchor block after
it), then `top_layers` dense blocks. chunks = 1 without dense layers is the paper's single pool.

Load balancing: the Switch loss N * sum_m f_m * P_m per pool, SKIP counted as a class, with f
and P pooled over the H steps of a pool (--balance_over pool, the official default) or per step
(steps). f counts all K choices (the official code counts only the top-1).

Routing of token j reads only token j's hidden state, so it is causal by construction; the KV
cache keeps, per step, the keys/values each assembly attended over.

Two-stage training: `MoMGPT.from_dense` builds each chunk's pools from its dense layers, copies
the dense layers, embeddings, ln_f and head, and initialises the routers fresh (or biased to the
dense order with --router_init layer_order).
"""

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, MLP, Block, CausalSelfAttention, KVCache, LayerNorm, attention_flops, block_matmul_params
from router import ModuleRouter, add_rows_, pack_mask, switch_balance_loss


@dataclass
class MoMConfig:
    n_attn_modules: int = 0  # attention modules per chunk's pool; 0 = the chunk's dense layers
    n_ffn_modules: int = 0  # FFN modules per chunk's pool; 0 = the chunk's dense layers
    assembly_steps: int = 0  # H, assembly steps per chunk; 0 = the chunk's dense layers
    modules_per_step: int = 1  # K, choices per token per step from each pool (SKIP included)
    router_kind: str = "gru"  # "gru": state carries across the H steps (the paper); "mlp": stateless
    router_temperature: float = 1.0  # softmax temperature of the routers (official scripts: 0.2)
    router_init: str = "fresh"  # "fresh" (the paper) | "layer_order": start near module h at step h
    balance_coef: float = 0.01  # weight of the Switch load-balancing loss
    balance_over: str = "pool"  # "pool": f, P over all steps of a pool (official) | "steps": per step
    attn_assembly: str = "per_module"  # "per_module" (K separate attentions) | "official" (summed q/k/v)
    bottom_layers: int = 0  # dense blocks kept below the routed part
    top_layers: int = 0  # dense blocks kept above it
    chunks: int = 1  # routed chunks; each has its own pools, routers and steps (and an anchor if > 1)

    def __post_init__(self):
        for flag in ("n_attn_modules", "n_ffn_modules", "assembly_steps", "bottom_layers", "top_layers"):
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag} must be >= 0, got {getattr(self, flag)}")
        if self.chunks < 1:
            raise ValueError(f"--chunks must be >= 1, got {self.chunks}")
        if self.modules_per_step < 1:
            raise ValueError(f"--modules_per_step must be >= 1, got {self.modules_per_step}")
        for flag in ("n_attn_modules", "n_ffn_modules"):
            pool = getattr(self, flag)
            if pool and self.modules_per_step > pool + 1:
                raise ValueError(f"--modules_per_step ({self.modules_per_step}) cannot exceed --{flag} + 1 "
                                 f"(the pool plus SKIP = {pool + 1})")
        choices = dict(router_kind=("mlp", "gru"), router_init=("fresh", "layer_order"),
                       balance_over=("pool", "steps"), attn_assembly=("per_module", "official"))
        for flag, allowed in choices.items():
            if getattr(self, flag) not in allowed:
                raise ValueError(f"--{flag} must be one of {', '.join(allowed)}, got {getattr(self, flag)!r}")
        if not self.router_temperature > 0:
            raise ValueError(f"--router_temperature must be > 0, got {self.router_temperature}")
        if self.balance_coef < 0:
            raise ValueError(f"--balance_coef must be >= 0, got {self.balance_coef}")

    def layers_per_chunk(self, n_layer):
        """The dense layers each chunk stands for, once n_layer is known (ValueError otherwise)."""
        anchors = self.chunks if self.chunks > 1 else 0
        routed = n_layer - self.bottom_layers - self.top_layers - anchors
        if routed < self.chunks or routed % self.chunks:
            raise ValueError(f"--chunks {self.chunks} must divide the {routed} routed layers left of n_layer "
                             f"{n_layer} by --bottom_layers {self.bottom_layers}, --top_layers {self.top_layers}"
                             f" and {anchors} anchor layers, into chunks of at least one layer")
        return routed // self.chunks


def group_by_module(chosen, n_modules):
    """Choices (B, T, K) -> slots (S,) = flat indices token * K + k of every non-SKIP choice,
    sorted by module (one argsort), and the number of slots per module (Python ints)."""
    ids = chosen.reshape(-1)
    order = ids.argsort(stable=True)  # SKIP (= n_modules) sorts last
    counts = torch.bincount(ids, minlength=n_modules + 1)[:n_modules].tolist()
    return order[:sum(counts)], counts


def by_module(pool, rows, counts, fn):
    """fn(module, its contiguous slice of rows) for every module somebody chose, concatenated in
    slot order (a single chosen module, the usual case at decode, needs no concatenation).
    Slices come from one split, whose backward joins their gradients with one cat: a slice
    taken by indexing would write its gradient into a zero tensor of all the rows, per module."""
    outs = [fn(module, part) for module, part in zip(pool, rows.split(counts)) if len(part)]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def add_by_module(x, pool, rows, counts, probs, chosen, slots, fn):
    """x + sum_k p_jk * output of choice k of token j, SKIP adding nothing: every chosen module
    runs fn on its contiguous slice of rows (slot order) and its weighted outputs are added at
    their tokens by add_rows_, all into one copy of x. No zero tensor, no concatenation, and the
    residual's gradient passes through untouched."""
    B, T, K = chosen.shape
    weight = probs.gather(-1, chosen).reshape(-1).index_select(0, slots)[:, None]  # p of each slot
    new_x = x.reshape(B * T, -1).clone()
    for module, part, p, token in zip(pool, rows.split(counts), weight.split(counts), (slots // K).split(counts)):
        if len(part):
            add_rows_(new_x, token, (p * fn(module, part)).to(x.dtype))  # a module's tokens never repeat
    return new_x.view_as(x)


def add_all(x, terms):
    """x + (t_1 + t_2 + ...), x itself if none (one token's weighted module outputs at decode)."""
    if not terms:
        return x
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return x + total


def split_heads(t, n_head):
    """(N, T, C) -> (N, n_head, T, C // n_head)."""
    N, T, C = t.shape
    return t.view(N, T, n_head, C // n_head).transpose(1, 2)


def merge_heads(t):
    N, n_head, T, hs = t.shape
    return t.transpose(1, 2).reshape(N, T, n_head * hs)


def causal_attention(qkv, n_head, cache=None, dropout_p=0.0):
    """Causal attention of every token of qkv (N, T, 3C) after the cache's keys -> (N, T, C)."""
    T = qkv.size(1)
    q, k, v = (split_heads(t, n_head) for t in qkv.chunk(3, dim=2))
    past = 0 if cache is None else len(cache)
    if cache is not None:
        k, v = cache.append(k, v)
    mask = None  # no cache: is_causal; one new token: it may see every key, so no mask at all
    if past and T > 1:
        mask = torch.ones(T, past + T, dtype=torch.bool, device=qkv.device).tril(past)
    return merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=past == 0 and T > 1,
                                                      dropout_p=dropout_p))


def attention_in_slot_order(qkv_sorted, chosen, slots, n_modules, n_head, dropout_p=0.0):
    """per_module attention without a cache, from slot order and back to it. Assembly k of row b
    (attention row r = k * B + b) is the causal sequence of row b's non-SKIP k-th choices; its
    q/k/v are gathered straight from qkv_sorted (S, 3C) into packed rows and the outputs gathered
    straight back: two gathers, where going through token order would take four plus zeros."""
    B, T, K = chosen.shape
    S, device = slots.numel(), slots.device
    order, valid = pack_mask((chosen != n_modules).permute(2, 0, 1).reshape(K * B, T))  # (K*B, n)
    row = torch.arange(K * B, device=device)[:, None]
    slot = ((row % B) * T + order) * K + row // B  # the flat slot (b * T + t) * K + k of each packed entry
    position = torch.zeros(B * T * K, dtype=torch.long, device=device).index_copy_(
        0, slots, torch.arange(S, device=device))  # where each slot sits in slot order
    packed = torch.where(valid, position[slot], 0)  # padding reads row 0: it comes after every real token
    qkv = qkv_sorted.index_select(0, packed.flatten()).view(*packed.shape, -1)
    y = causal_attention(qkv, n_head, dropout_p=dropout_p)  # (K*B, n, C)
    back = torch.empty(S, dtype=torch.long, device=device).index_copy_(
        0, packed[valid], torch.arange(packed.numel(), device=device)[valid.flatten()])
    return y.reshape(-1, y.size(-1)).index_select(0, back)


def cached_attention_among(qkv, keep, n_head, caches):
    """Attention for generation among the kept tokens (keep: (N, T) bool) of each row of qkv
    (N, T, 3C): row r's kept tokens are appended to caches[r] and attend to everything cached
    there plus, causally, to each other; a token not kept neither asks nor is a key. A row
    with no kept token writes nothing."""
    N, T, C3 = qkv.shape
    out = qkv.new_zeros(N, T, C3 // 3)
    for r, kept in enumerate(keep.tolist()):
        if all(kept):  # the common case at decode: the row's token chose a module
            out[r] = causal_attention(qkv[r:r + 1], n_head, caches[r])[0]
        elif any(kept):
            index = torch.tensor([t for t, k in enumerate(kept) if k], device=qkv.device)
            out[r, index] = causal_attention(qkv[r:r + 1, index], n_head, caches[r])[0]
    return out


class MoMCache:
    """Generation cache: one KVCache per dense block (bottom, anchors, top), and for every chunk
    and step the KVCaches of its attention rows (one per (assembly k, batch row) for per_module,
    one for the whole batch for official), made when the step first runs."""

    def __init__(self, bottom, chunks, top, steps):
        self.bottom, self.anchors, self.top = ([KVCache() for _ in range(n)] for n in (bottom, chunks, top))
        self.steps = [[[] for _ in range(steps)] for _ in range(chunks)]

    def __iter__(self):  # every KVCache, so that GPT.kv_cache_nbytes counts this cache like a dense one
        yield from (*self.bottom, *self.anchors, *self.top)
        yield from (c for steps in self.steps for caches in steps for c in caches)


class MoMChunk(nn.Module):
    """Two pools, their routers and H assembly steps (then an optional dense anchor block)."""

    def __init__(self, config, settings, n_attn, n_ffn, steps, anchor):
        super().__init__()
        self.config, self.steps, self.K, self.assembly = config, steps, settings.modules_per_step, settings.attn_assembly
        self.attn_pool = nn.ModuleList(
            nn.ModuleDict(dict(ln_1=LayerNorm(config.n_embd, config.bias), attn=CausalSelfAttention(config)))
            for _ in range(n_attn))
        self.ffn_pool = nn.ModuleList(
            nn.ModuleDict(dict(ln_2=LayerNorm(config.n_embd, config.bias), mlp=MLP(config)))
            for _ in range(n_ffn))
        layer_order = settings.router_init == "layer_order"
        self.attn_router, self.ffn_router = (  # last choice: SKIP
            ModuleRouter(config.n_embd, n + 1, settings.router_kind, steps, settings.router_temperature,
                         config.bias, step_bias=layer_order) for n in (n_attn, n_ffn))
        self.anchor = Block(config) if anchor else None

    def route(self, router, x, state, h):
        logits, state = router(x, state, h)
        probs = logits.softmax(dim=-1)
        return probs, probs.topk(self.K, dim=-1).indices, state  # ranked: assembly k takes the k-th choice

    def forward(self, x, cache=None, anchor_cache=None):
        """cache: None, or this chunk's list of per-step KVCache lists from MoMCache.steps."""
        if cache is not None and not cache[0]:  # first call: one KVCache per attention row
            rows = x.size(0) * self.K if self.assembly == "per_module" else 1
            cache[:] = [[KVCache() for _ in range(rows)] for _ in cache]
        if cache is not None and x.shape[:2] == (1, 1):
            x = self.decode_one_token(x, cache)
            return (x if self.anchor is None else self.anchor(x, anchor_cache)), None
        attn_state = ffn_state = None  # GRU states: one per token, carried across the H steps
        record = {"attn_probs": [], "attn": [], "ffn_probs": [], "ffn": []}
        for h in range(self.steps):
            probs, chosen, attn_state = self.route(self.attn_router, x, attn_state, h)
            x = self.attention_assembly(x, probs, chosen, None if cache is None else cache[h])
            record["attn_probs"].append(probs)
            record["attn"].append(chosen)
            probs, chosen, ffn_state = self.route(self.ffn_router, x, ffn_state, h)
            x = self.ffn_assembly(x, probs, chosen)
            record["ffn_probs"].append(probs)
            record["ffn"].append(chosen)
        if self.anchor is not None:
            x = self.anchor(x, anchor_cache)
        return x, {name: torch.stack(values) for name, values in record.items()}  # (H, B, T, ...)

    def decode_one_token(self, x, caches):
        """forward for one token of one sequence with a cache (generation): the same sums over
        each step's chosen modules, as plain module calls. At decode every op is its own small
        kernel, so the general path's sort, gathers and scatters would cost more than the modules."""
        attn_state = ffn_state = None
        for h in range(self.steps):  # probabilities and choices as Python numbers: fewer small ops
            probs, chosen, attn_state = self.route(self.attn_router, x, attn_state, h)
            x = self.one_token_attention(x, probs.tolist()[0][0], chosen.tolist()[0][0], caches[h])
            probs, chosen, ffn_state = self.route(self.ffn_router, x, ffn_state, h)
            p = probs.tolist()[0][0]
            updates = [p[m] * self.ffn_pool[m].mlp(self.ffn_pool[m].ln_2(x))
                       for m in chosen.tolist()[0][0] if m < len(self.ffn_pool)]  # SKIP adds nothing
            x = add_all(x, updates)
        return x

    def one_token_attention(self, x, probs, chosen, caches):
        """x plus attention_assembly for one token: per_module, choice k attends with its
        module's q/k/v over caches[k] (a SKIP writes nothing); official, the chosen modules'
        q/k/v are summed (all SKIP: a zero key and value) and attend once over caches[0]."""
        n_head = self.config.n_head
        modules = [(k, self.attn_pool[m], probs[m]) for k, m in enumerate(chosen) if m < len(self.attn_pool)]
        if self.assembly == "official":
            qkv = add_all(x.new_zeros(*x.shape[:2], 3 * x.size(-1)), [m.attn.c_attn(m.ln_1(x)) for _, m, _ in modules])
            y = causal_attention(qkv, n_head, caches[0])
            return add_all(x, [p * m.attn.c_proj(y) for _, m, p in modules])
        return add_all(x, [p * m.attn.c_proj(causal_attention(m.attn.c_attn(m.ln_1(x)), n_head, caches[k]))
                           for k, m, p in modules])

    def attention_assembly(self, x, probs, chosen, caches=None):
        """x + sum_k p_jk * A_{m_jk}(x)_j. q/k/v of different tokens come from different modules, so no
        module runs whole: each computes q/k/v for its tokens, attention runs once, then each
        module projects its tokens' outputs."""
        B, T, C = x.shape
        K, N, n_head = self.K, len(self.attn_pool), self.config.n_head
        slots, counts = group_by_module(chosen, N)
        if slots.numel() == 0:  # every token chose SKIP
            if caches is not None and self.assembly == "official":  # SKIP is still a zero key and value
                causal_attention(x.new_zeros(B, T, 3 * C), n_head, caches[0])
            return x
        token = slots // K
        rows = x.reshape(B * T, C).index_select(0, token)  # one gather: each module's tokens sit together
        qkv_sorted = by_module(self.attn_pool, rows, counts, lambda m, part: m.attn.c_attn(m.ln_1(part)))
        dropout_p = self.config.dropout if self.training else 0.0
        if self.assembly == "per_module" and caches is None:
            y = attention_in_slot_order(qkv_sorted, chosen, slots, N, n_head, dropout_p)
        elif self.assembly == "official":  # q/k/v summed over a token's modules; SKIP = zero key and value
            qkv = qkv_sorted.new_zeros(B * T * K, 3 * C).index_copy(0, slots, qkv_sorted).view(B, T, K, 3 * C)
            y = causal_attention(qkv.sum(2), n_head, None if caches is None else caches[0], dropout_p)
            y = y.reshape(B * T, C)[token]
        else:  # cached per_module: each (assembly, row) appends its non-SKIP tokens to its own cache
            qkv = qkv_sorted.new_zeros(B * T * K, 3 * C).index_copy(0, slots, qkv_sorted).view(B, T, K, 3 * C)
            qkv = qkv.permute(2, 0, 1, 3).reshape(K * B, T, 3 * C)
            keep = (chosen != N).permute(2, 0, 1).reshape(K * B, T)
            y = cached_attention_among(qkv, keep, n_head, caches)
            y = y.view(K, B, T, C).permute(1, 2, 0, 3).reshape(B * T * K, C)[slots]
        return add_by_module(x, self.attn_pool, y, counts, probs, chosen, slots,
                             lambda m, part: m.attn.resid_dropout(m.attn.c_proj(part)))

    def ffn_assembly(self, x, probs, chosen):
        """x + sum_k p_jk * F_{m_jk}(x_j): each module runs once, on its contiguous slice of tokens."""
        B, T, C = x.shape
        slots, counts = group_by_module(chosen, len(self.ffn_pool))
        if slots.numel() == 0:
            return x
        rows = x.reshape(B * T, C).index_select(0, slots // self.K)
        return add_by_module(x, self.ffn_pool, rows, counts, probs, chosen, slots, lambda m, part: m.mlp(m.ln_2(part)))


class MoMGPT(GPT):
    ddp_find_unused_parameters = True  # a module no token chose in a step gets no gradient

    def __init__(self, config, settings):
        super().__init__(config)
        P = settings.layers_per_chunk(config.n_layer)
        settings = replace(settings, n_attn_modules=settings.n_attn_modules or P,  # replace() validates again
                           n_ffn_modules=settings.n_ffn_modules or P, assembly_steps=settings.assembly_steps or P)
        self.settings = settings
        self.loss_weights = {"mom_balance": settings.balance_coef}
        del self.transformer.h  # the stack of blocks becomes dense blocks and routed chunks
        s = settings
        self.bottom = nn.ModuleList(Block(config) for _ in range(s.bottom_layers))
        self.chunks = nn.ModuleList(MoMChunk(config, s, s.n_attn_modules, s.n_ffn_modules, s.assembly_steps,
                                             anchor=s.chunks > 1) for _ in range(s.chunks))
        self.top = nn.ModuleList(Block(config) for _ in range(s.top_layers))
        self.n_dense = s.bottom_layers + s.top_layers + (s.chunks if s.chunks > 1 else 0)
        for part in (self.bottom, self.chunks, self.top):
            part.apply(self._init_weights)
        updates = 2 * (self.n_dense + s.chunks * s.assembly_steps)  # GPT-2's depth scaling, per residual update
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / updates ** 0.5)
        if s.router_init == "layer_order":  # step h's target: the module standing for step h's layer
            for chunk in self.chunks:
                for router, n in ((chunk.attn_router, s.n_attn_modules), (chunk.ffn_router, s.n_ffn_modules)):
                    router.start_in_layer_order([h * n // s.assembly_steps for h in range(s.assembly_steps)])
        self.last_routing = None  # per chunk: choices (H, B, T, K) and probabilities of each pool

    # --- the GPT seam -------------------------------------------------------------------------

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
        self.last_routing = [{k: v.detach() for k, v in r.items() if not k.endswith("probs")} for r in routing]
        return x, {"mom_balance": self.balance_loss(routing)}

    def balance_loss(self, routing):
        """Mean Switch loss over every pool of every chunk (and every step with balance_over=steps)."""
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
        return MoMCache(s.bottom_layers, s.chunks, s.top_layers, s.assembly_steps)

    def kept(self, record):
        """(attention, FFN) masks (H, B, T, K) of the choices that took a real module."""
        return record["attn"] != len(self.chunks[0].attn_pool), record["ffn"] != len(self.chunks[0].ffn_pool)

    @torch.no_grad()
    def evaluate(self, idx, targets):
        _, loss, aux = self(idx, targets)
        attn_kept = torch.cat([self.kept(r)[0].flatten() for r in self.last_routing]).float().mean().item()
        ffn_kept = torch.cat([self.kept(r)[1].flatten() for r in self.last_routing]).float().mean().item()
        return {
            "loss": loss.item(),
            "mom_balance": aux["mom_balance"].item(),
            "modules_used": self.settings.modules_per_step * (attn_kept + ffn_kept) / 2,  # per pool and step
            "skip_rate": 1 - (attn_kept + ffn_kept) / 2,
            "attn_skip_rate": 1 - attn_kept,
            "ffn_skip_rate": 1 - ffn_kept,
            "flops_per_token": self.routing_flops_per_token(self.last_routing),
        }

    @torch.no_grad()
    def depth_per_token(self, idx, prompt_len):
        """(B, T) fraction of the token's sublayer slots (2 per dense block, 2HK per chunk) that
        ran a real module (1 = no SKIP anywhere). Routing is causal, so a full forward tells what
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
        """Training FLOPs per token of a realised routing (6 x matmul weights + 12 d T per attended
        layer, LM head counted). A token pays the matmuls of each real module it chose; per_module:
        in assembly (h, k) of a row with n non-SKIP tokens each of them attends over n keys;
        official: every token attends over all T every step. Both routers run for every token at
        every step; dense blocks cost what they cost in GPT."""
        B, T = routing[0]["attn"].shape[1:3]
        d = self.config.n_embd
        attn_params = block_matmul_params(d) // 3  # c_attn 3d^2 + c_proj d^2; the MLP holds the other 8d^2
        ffn_params = block_matmul_params(d) - attn_params
        total = self.n_dense * (6 * block_matmul_params(d) + attention_flops(d, T)) * B * T
        for chunk, record in zip(self.chunks, routing):
            attn_kept, ffn_kept = self.kept(record)
            total += 6 * attn_params * attn_kept.sum().item() + 6 * ffn_params * ffn_kept.sum().item()
            if chunk.assembly == "official":
                total += attention_flops(d, T) * chunk.steps * B * T
            else:
                total += attention_flops(d, 1) * (attn_kept.sum(dim=2).double() ** 2).sum().item()
            total += 6 * chunk.steps * (chunk.attn_router.matmul_params() + chunk.ffn_router.matmul_params()) * B * T
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
        """Stage 2. Dense layers in order: bottom_layers, then per chunk its P routed layers (and its
        anchor), then top_layers. A pool of n modules takes the chunk's layers i * P // n, i < n:
        evenly spaced from the first, all P when n = P (the official layer map takes the first n).
        Dense blocks, embeddings, ln_f and head are copied; routers start fresh."""
        L = dense.config.n_layer
        P = settings.layers_per_chunk(L)
        for flag in ("n_attn_modules", "n_ffn_modules"):
            if getattr(settings, flag) > P:
                raise ValueError(f"--{flag} ({getattr(settings, flag)}) exceeds the {P} dense layers per chunk "
                                 f"that can fill the pool")
        model = cls(replace(dense.config), settings)
        layers = iter(dense.transformer.h)
        with torch.no_grad():
            for name in ("transformer.wte", "transformer.wpe", "transformer.ln_f", "lm_head"):
                model.get_submodule(name).load_state_dict(dense.get_submodule(name).state_dict())
            for block in model.bottom:
                block.load_state_dict(next(layers).state_dict())
            for chunk in model.chunks:
                chunk_layers = [next(layers) for _ in range(P)]
                for pool in (chunk.attn_pool, chunk.ffn_pool):
                    for i, module in enumerate(pool):
                        source = chunk_layers[i * P // len(pool)]
                        for part, sub in module.items():
                            sub.load_state_dict(getattr(source, part).state_dict())
                if chunk.anchor is not None:
                    chunk.anchor.load_state_dict(next(layers).state_dict())
            for block in model.top:
                block.load_state_dict(next(layers).state_dict())
        return model
