"""
Mixture-of-Modules (Gong et al. 2024, arXiv 2407.06677).

The layers of a transformer become two pools: attention modules A_1..A_N (ln_1 + attention)
and FFN modules F_1..F_M (ln_2 + MLP), each pool with one more, parameter-free choice, SKIP.
Two routers (one per pool) assemble a network per token over H steps. At step h each token
picks its top-K choices from each pool, with p the router's softmax:

    x_j <- x_j + sum_{m in topK(p^A_j), m != SKIP} p^A_jm * A_m(x)_j     attention assembly
    x_j <- x_j + sum_{m in topK(p^F_j), m != SKIP} p^F_jm * F_m(x_j)      FFN assembly

The weights are the softmax probabilities themselves, not renormalised over the top-K (Switch
style): with K = 1 a renormalised weight would always be 1 and the router would get no gradient
from the language-model loss.

Attention A_m(x)_j: token j's query, key and value come from the module token j chose; one
causal attention runs over the tokens that did not choose SKIP, and each token's output goes
through the output projection of its own module. A SKIP token is unchanged and is not a key.
With K > 1 the choices are ranked: the k-th choices of all tokens form the k-th assembly (its own
token -> module map and its own attention over its own non-SKIP tokens), and the K assemblies'
outputs are summed with their weights. (The paper leaves K > 1 attention open; this is our choice.)

Routers: `mlp` scores the current hidden state; `gru` runs a GRU cell whose state carries across
the H steps of each token, so what a token assembles next can depend on what it assembled before.
Load balancing: the Switch loss N * sum_m f_m * P_m per pool and step, SKIP counted as a class.

Routing of token j reads only token j's hidden state, so it is causal by construction: the
KV cache keeps, per step and per assembly, the keys/values of the tokens that chose a real module
(from that module); a SKIP writes nothing.

Two-stage training: `MoMGPT.from_dense` builds the pools from a trained dense GPT's layers
(attention module i = layer i's ln_1 + attention, FFN module i = its ln_2 + MLP), copies the
embeddings, ln_f and head, and initialises the routers fresh.
"""

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, MLP, CausalSelfAttention, KVCache, LayerNorm, attention_flops, block_matmul_params
from router import pack_mask, switch_balance_loss

SKIP = -1  # in `forced_modules`: the parameter-free choice (its router index is the pool size)


@dataclass
class MoMConfig:
    n_attn_modules: int = 0  # attention modules in the pool; 0 = the dense model's n_layer
    n_ffn_modules: int = 0  # FFN modules in the pool; 0 = the dense model's n_layer
    assembly_steps: int = 0  # H, assembly steps per token; 0 = n_layer
    modules_per_step: int = 1  # K, choices per token per step from each pool (SKIP included)
    router_kind: str = "gru"  # "gru": state carries across the H steps (the paper); "mlp": stateless
    balance_coef: float = 0.01  # weight of the Switch load-balancing loss

    def __post_init__(self):
        for flag in ("n_attn_modules", "n_ffn_modules", "assembly_steps"):
            if getattr(self, flag) < 0:
                raise ValueError(f"--{flag} must be >= 0 (0 = the dense model's n_layer), got {getattr(self, flag)}")
        if self.modules_per_step < 1:
            raise ValueError(f"--modules_per_step must be >= 1, got {self.modules_per_step}")
        for flag in ("n_attn_modules", "n_ffn_modules"):
            pool = getattr(self, flag)
            if pool and self.modules_per_step > pool + 1:
                raise ValueError(f"--modules_per_step ({self.modules_per_step}) cannot exceed --{flag} + 1 "
                                 f"(the pool plus SKIP = {pool + 1})")
        if self.router_kind not in ("mlp", "gru"):
            raise ValueError(f"--router_kind must be 'mlp' or 'gru', got {self.router_kind!r}")
        if self.balance_coef < 0:
            raise ValueError(f"--balance_coef must be >= 0, got {self.balance_coef}")


class Router(nn.Module):
    """Scores the choices of one pool (its modules, then SKIP) for every token at one step."""

    def __init__(self, config, n_choices, kind):
        super().__init__()
        width = max(16, config.n_embd // 8)  # a router costs a few percent of a block
        self.kind = kind
        self.ln = LayerNorm(config.n_embd, bias=config.bias)  # the residual stream grows with depth
        if kind == "gru":
            self.cell = nn.GRUCell(config.n_embd, width, bias=config.bias)
        else:
            self.hidden = nn.Linear(config.n_embd, width, bias=config.bias)
        self.out = nn.Linear(width, n_choices, bias=config.bias)

    def forward(self, x, state=None):
        """x: (B, T, C), state: (B*T, width) or None -> logits (B, T, n_choices), new state."""
        B, T, C = x.shape
        z = self.ln(x).reshape(B * T, C)
        if self.kind == "gru":
            state = self.cell(z, state)  # None starts from zeros
            hidden = state
        else:
            hidden = F.gelu(self.hidden(z), approximate="tanh")
        return self.out(hidden).view(B, T, -1), state

    def matmul_params(self):
        return sum(p.numel() for p in self.parameters() if p.dim() == 2)


class MoMCache:
    """Generation cache: for every assembly step, one KVCache per (assembly k, batch row) holding
    the keys/values of the tokens that chose a real attention module there."""

    def __init__(self, steps):
        self.steps = [[] for _ in range(steps)]

    def step(self, h, n_rows):
        if not self.steps[h]:
            self.steps[h] = [KVCache() for _ in range(n_rows)]
        return self.steps[h]

    def __iter__(self):  # every KVCache, so that GPT.kv_cache_nbytes counts this cache like a dense one
        return (c for caches in self.steps for c in caches)


def split_heads(t, n_head):
    """(N, T, C) -> (N, n_head, T, C // n_head)."""
    N, T, C = t.shape
    return t.view(N, T, n_head, C // n_head).transpose(1, 2)


def merge_heads(t):
    N, n_head, T, hs = t.shape
    return t.transpose(1, 2).reshape(N, T, n_head * hs)


def attention_among(qkv, keep, n_head, dropout_p=0.0):
    """Causal self-attention among the kept tokens of each row: a token not kept neither asks nor
    is a key. qkv: (N, T, 3C), keep: (N, T) bool -> (N, T, C); rows of tokens not kept hold junk
    that callers never read."""
    N, T, C3 = qkv.shape
    order, _ = pack_mask(keep)  # (N, n): kept tokens first, in causal order, padding after them
    if order.size(1) == 0:
        return qkv.new_zeros(N, T, C3 // 3)
    q, k, v = (split_heads(t, n_head) for t in qkv.gather(1, order[..., None].expand(-1, -1, C3)).chunk(3, dim=2))
    y = merge_heads(F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p))
    return y.new_zeros(N, T, C3 // 3).scatter(1, order[..., None].expand(-1, -1, C3 // 3), y)


def cached_attention_among(qkv, keep, n_head, caches):
    """attention_among for generation: row r's kept tokens are appended to caches[r] and attend
    to everything cached there plus, causally, to each other. A row with no kept token writes nothing."""
    N, T, C3 = qkv.shape
    out = qkv.new_zeros(N, T, C3 // 3)
    for r in range(N):
        kept = keep[r].nonzero().squeeze(1)
        if kept.numel() == 0:
            continue
        q, k, v = (split_heads(t, n_head) for t in qkv[r, kept][None].chunk(3, dim=2))
        past = len(caches[r])
        k, v = caches[r].append(k, v)
        mask = torch.ones(kept.numel(), past + kept.numel(), dtype=torch.bool, device=qkv.device).tril(past)
        out[r, kept] = merge_heads(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))[0].to(out.dtype)
    return out


class MoMGPT(GPT):
    ddp_find_unused_parameters = True  # a module no token chose in a step gets no gradient

    def __init__(self, config, vcfg):
        super().__init__(config)
        L = config.n_layer
        vcfg = replace(vcfg, n_attn_modules=vcfg.n_attn_modules or L, n_ffn_modules=vcfg.n_ffn_modules or L,
                       assembly_steps=vcfg.assembly_steps or L)  # replace() validates again
        self.vcfg = vcfg
        self.loss_weights = {"mom_balance": vcfg.balance_coef}
        del self.transformer.h  # the stack of blocks becomes the two pools
        self.attn_pool = nn.ModuleList(
            nn.ModuleDict(dict(ln_1=LayerNorm(config.n_embd, config.bias), attn=CausalSelfAttention(config)))
            for _ in range(vcfg.n_attn_modules))
        self.ffn_pool = nn.ModuleList(
            nn.ModuleDict(dict(ln_2=LayerNorm(config.n_embd, config.bias), mlp=MLP(config)))
            for _ in range(vcfg.n_ffn_modules))
        self.attn_router = Router(config, vcfg.n_attn_modules + 1, vcfg.router_kind)  # last choice: SKIP
        self.ffn_router = Router(config, vcfg.n_ffn_modules + 1, vcfg.router_kind)
        for part in (self.attn_pool, self.ffn_pool, self.attn_router, self.ffn_router):
            part.apply(self._init_weights)
        for name, p in [*self.attn_pool.named_parameters(), *self.ffn_pool.named_parameters()]:
            if name.endswith("c_proj.weight"):  # GPT-2's depth scaling, with 2H residual updates
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / (2 * vcfg.assembly_steps) ** 0.5)
        self.forced_modules = None  # tests/analysis: one (attention, FFN) module index per step, weight 1
        self.last_routing = None  # choices of the last forward, (H, B, T, K) per pool

    # --- routing ---------------------------------------------------------------------------

    def route(self, router, x, state, forced):
        """Top-K choices of one pool for every token. Returns probs (B, T, n+1), chosen (B, T, K)
        where index n is SKIP, and the router's new state."""
        if forced is None:
            logits, state = router(x, state)
            probs = logits.softmax(dim=-1)
        else:  # every token takes the forced module with probability (and so weight) 1
            n_choices = router.out.out_features
            index = n_choices - 1 if forced == SKIP else forced
            probs = F.one_hot(torch.full(x.shape[:2], index, device=x.device), n_choices).to(x.dtype)
        chosen = probs.topk(self.vcfg.modules_per_step, dim=-1).indices  # ranked: assembly k takes the k-th choice
        return probs, chosen, state

    @staticmethod
    def served_tokens(chosen, n_modules):
        """For each module, the (token, assembly) pairs that chose it, tokens flattened to B*T.
        A module nobody chose gets empty indices and is never run."""
        flat = chosen.reshape(-1, chosen.size(-1))
        return [(flat == m).nonzero(as_tuple=True) for m in range(n_modules)]

    # --- the two assemblies ------------------------------------------------------------------

    def attention_assembly(self, x, probs, chosen, caches=None):
        """sum_k p_jk * A_{m_jk}(x)_j: K assemblies, each one causal attention over its own
        non-SKIP tokens, q/k/v and output projection from the module each token chose."""
        B, T, C = x.shape
        K, N = chosen.size(-1), len(self.attn_pool)
        flat, p = x.reshape(B * T, C), probs.reshape(B * T, -1)
        served = self.served_tokens(chosen, N)
        # q/k/v of different tokens come from different modules, so no module's forward can run
        # whole: each module computes q/k/v for its tokens, the attention runs once, then each
        # module projects its tokens' outputs
        parts = [(token, k, module.attn.c_attn(module.ln_1(flat[token])))
                 for module, (token, k) in zip(self.attn_pool, served) if token.numel()]
        if not parts:
            return torch.zeros_like(x)  # every token chose SKIP
        qkv = parts[0][2].new_zeros(K, B * T, 3 * C)  # the matmuls' dtype (autocast may lower it)
        for token, k, values in parts:
            qkv[k, token] = values
        keep = (chosen != N).permute(2, 0, 1).reshape(K * B, T)  # assembly-major, like qkv
        qkv = qkv.view(K * B, T, 3 * C)
        n_head = self.config.n_head
        if caches is None:
            dropout_p = self.config.dropout if self.training else 0.0
            y = attention_among(qkv, keep, n_head, dropout_p)
        else:
            y = cached_attention_among(qkv, keep, n_head, caches)
        y = y.view(K, B * T, C)
        update = torch.zeros_like(flat)
        for m, (module, (token, k)) in enumerate(zip(self.attn_pool, served)):
            if token.numel():
                out = module.attn.resid_dropout(module.attn.c_proj(y[k, token]))
                update = update.index_add(0, token, (p[token, m, None] * out).to(update.dtype))
        return update.view(B, T, C)

    def ffn_assembly(self, x, probs, chosen):
        """sum_k p_jk * F_{m_jk}(x_j): each module runs on the tokens that chose it."""
        B, T, C = x.shape
        flat, p = x.reshape(B * T, C), probs.reshape(B * T, -1)
        update = torch.zeros_like(flat)
        for m, (module, (token, _)) in enumerate(zip(self.ffn_pool, self.served_tokens(chosen, len(self.ffn_pool)))):
            if token.numel():  # a token picks a module at most once, so `token` has no repeats
                out = module.mlp(module.ln_2(flat[token]))
                update = update.index_add(0, token, (p[token, m, None] * out).to(update.dtype))
        return update.view(B, T, C)

    # --- the GPT seam -------------------------------------------------------------------------

    def forward_trunk(self, x, cache=None):
        H = self.vcfg.assembly_steps
        forced = self.forced_modules or [(None, None)] * H
        if len(forced) != H:
            raise ValueError(f"forced_modules needs one (attention, FFN) pair per step ({H}), got {len(forced)}")
        attn_state = ffn_state = None  # GRU states: one per token, carried across the H steps
        balance, attn_choices, ffn_choices = [], [], []
        for h in range(H):
            probs, chosen, attn_state = self.route(self.attn_router, x, attn_state, forced[h][0])
            caches = None if cache is None else cache.step(h, chosen.size(-1) * x.size(0))
            x = x + self.attention_assembly(x, probs, chosen, caches)
            balance.append(switch_balance_loss(probs, chosen, probs.size(-1)))
            attn_choices.append(chosen)

            probs, chosen, ffn_state = self.route(self.ffn_router, x, ffn_state, forced[h][1])
            x = x + self.ffn_assembly(x, probs, chosen)
            balance.append(switch_balance_loss(probs, chosen, probs.size(-1)))
            ffn_choices.append(chosen)
        self.last_routing = {"attn": torch.stack(attn_choices).detach(), "ffn": torch.stack(ffn_choices).detach()}
        return x, {"mom_balance": torch.stack(balance).mean()}

    def new_cache(self):
        return MoMCache(self.vcfg.assembly_steps)

    @torch.no_grad()
    def evaluate(self, idx, targets):
        _, loss, aux = self(idx, targets)
        attn_skip = (self.last_routing["attn"] == len(self.attn_pool)).float().mean().item()
        ffn_skip = (self.last_routing["ffn"] == len(self.ffn_pool)).float().mean().item()
        return {
            "loss": loss.item(),
            "mom_balance": aux["mom_balance"].item(),
            "modules_per_step": self.vcfg.modules_per_step * (1 - (attn_skip + ffn_skip) / 2),  # per pool
            "skip_rate": (attn_skip + ffn_skip) / 2,
            "attn_skip_rate": attn_skip,
            "ffn_skip_rate": ffn_skip,
            "flops_per_token": self.routing_flops_per_token(self.last_routing["attn"], self.last_routing["ffn"]),
        }

    @torch.no_grad()
    def depth_per_token(self, idx, prompt_len):
        """(B, T) fraction of the 2HK module slots each token filled with a real module (1 = no
        SKIP anywhere). Routing is causal, so a full forward tells what decoding used; text longer
        than the context is read in block_size windows."""
        depths = []
        for start in range(0, idx.size(1), self.config.block_size):
            self(idx[:, start:start + self.config.block_size])
            attn, ffn = self.last_routing["attn"], self.last_routing["ffn"]
            used = (attn != len(self.attn_pool)).sum(dim=(0, 3)) + (ffn != len(self.ffn_pool)).sum(dim=(0, 3))
            depths.append(used.float().cpu() / (2 * self.vcfg.assembly_steps * self.vcfg.modules_per_step))
        return torch.cat(depths, dim=1)

    # --- cost ----------------------------------------------------------------------------

    def routing_flops_per_token(self, attn_choices, ffn_choices):
        """Training FLOPs per token of a realised routing (DESIGN.md convention). choices:
        (H, B, T, K). A token pays the matmuls of each real module it chose; in assembly (h, k)
        of a row with n non-SKIP tokens, each of them attends over n keys; both routers run for
        every token at every step; plus the LM head."""
        H, B, T, K = attn_choices.shape
        d = self.config.n_embd
        attn_params = block_matmul_params(d) // 3  # c_attn 3d^2 + c_proj d^2; the MLP holds the other 8d^2
        ffn_params = block_matmul_params(d) - attn_params
        attn_kept = attn_choices != len(self.attn_pool)
        ffn_kept = ffn_choices != len(self.ffn_pool)
        keys = attn_kept.sum(dim=2).double()  # (H, B, K)
        total = (6 * attn_params * attn_kept.sum().item() + 6 * ffn_params * ffn_kept.sum().item()
                 + attention_flops(d, 1) * (keys ** 2).sum().item())
        routers = 6 * H * (self.attn_router.matmul_params() + self.ffn_router.matmul_params())
        return total / (B * T) + routers + 6 * d * self.config.vocab_size

    def flops_per_token(self, seq_len=None):
        """The ceiling: every token takes K real modules from both pools at every step (no SKIP).
        evaluate() reports the realised figure of the routing it saw."""
        T = seq_len or self.config.block_size
        every_token_uses_module_0 = torch.zeros(self.vcfg.assembly_steps, 1, T, self.vcfg.modules_per_step,
                                                dtype=torch.long)
        return self.routing_flops_per_token(every_token_uses_module_0, every_token_uses_module_0)

    # --- two-stage training ----------------------------------------------------------------

    @classmethod
    def from_dense(cls, dense, vcfg):
        """Stage 2: pools from the dense layers (attention module i = layer i's ln_1 + attn, FFN
        module i = its ln_2 + mlp); embeddings, ln_f and head copied; routers fresh."""
        L = dense.config.n_layer
        for flag in ("n_attn_modules", "n_ffn_modules"):
            if getattr(vcfg, flag) not in (0, L):
                raise ValueError(f"--{flag} must be 0 or the dense model's n_layer ({L}) to build the pool "
                                 f"from its layers, got {getattr(vcfg, flag)}")
        model = cls(replace(dense.config), vcfg)
        ours = model.state_dict()
        with torch.no_grad():
            for name, tensor in dense.state_dict().items():
                if name.startswith("transformer.h."):
                    _, _, layer, part, rest = name.split(".", 4)
                    pool = "attn_pool" if part in ("ln_1", "attn") else "ffn_pool"
                    name = f"{pool}.{layer}.{part}.{rest}"
                ours[name].copy_(tensor)
        return model
