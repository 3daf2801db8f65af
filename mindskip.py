"""
Router-Tuning with MindSkip (He et al. 2024, arXiv 2410.13184).

MindSkip puts a skip gate on the attention sublayer of some layers of a trained model:

    s = w . mean_t LN_1(x)_t                      one score per sequence (w zero-initialised)
    g = 1[sigmoid(s) >= 0.5]                      forward; d g / d s = sigmoid'(s) backward
    x <- x + g * Attn(LN_1(x))

A closed gate (g = 0) means the sublayer is not computed at all and, when generating, writes
no KV cache. The gate can sit on the MLP (x + g * MLP(LN_2(x))) or the whole block instead
(--skip attn | mlp | block), and can decide per token instead of per sequence.

Router-tuning freezes every weight of the trained model and trains only the routers w on a
small dataset (the paper: about 1,000 samples, one epoch) with

    loss = LM loss + lambda * relu(mean(g) - target_capacity)

The LM loss alone keeps every gate open; the hinge pushes the open share down to the target.
Zero-initialised routers give sigmoid(0) = 0.5 >= 0.5, so tuning starts from the dense model.
"""

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn

from model import GPT, KVCache, attention_flops, block_matmul_params
from router import capacity_hinge, straight_through_gate


@dataclass
class MindSkipConfig:
    skip: str = "attn"  # attn | mlp | block: the sublayer each routed layer may skip
    skip_layers: str = ""  # comma list of 0-based layers to route, e.g. "3,4,5"; "" = upper half minus the last (12 layers: 5-10)
    router_level: str = "sequence"  # sequence: one gate per sequence from the mean LN output | token: one per token (causal)
    target_capacity: float = 0.5  # share of routed sublayers the sparsity hinge lets stay open
    sparsity_coef: float = 10.0  # lambda, the weight of relu(mean gate - target_capacity); the LM loss alone keeps gates open
    gate_threshold: float = 0.5  # gate opens iff sigmoid(score) >= this; 0 forces open, > 1 forces closed

    def __post_init__(self):
        if self.skip not in ("attn", "mlp", "block"):
            raise ValueError(f"--skip must be attn, mlp or block, got {self.skip!r}")
        if self.router_level not in ("sequence", "token"):
            raise ValueError(f"--router_level must be sequence or token, got {self.router_level!r}")
        if not 0 <= self.target_capacity <= 1:
            raise ValueError(f"--target_capacity must be in [0, 1], got {self.target_capacity}")
        if not self.sparsity_coef >= 0:
            raise ValueError(f"--sparsity_coef must be >= 0, got {self.sparsity_coef}")
        if not self.gate_threshold >= 0:
            raise ValueError(f"--gate_threshold must be >= 0, got {self.gate_threshold}")
        self.explicit_layers()  # raises on a malformed list

    def explicit_layers(self):
        """The layers listed in --skip_layers (empty list for the default)."""
        parts = [p.strip() for p in self.skip_layers.split(",")] if self.skip_layers.strip() else []
        if not all(p.isdigit() for p in parts):
            raise ValueError(f"--skip_layers must be comma-separated layer numbers like 3,4,5, got {self.skip_layers!r}")
        layers = [int(p) for p in parts]
        if len(set(layers)) != len(layers):
            raise ValueError(f"--skip_layers lists a layer twice: {self.skip_layers!r}")
        return sorted(layers)

    def routed_layers(self, n_layer):
        """Layers that get a gate in an n_layer model. Default: n_layer // 2 layers ending just
        before the last one (the paper routes the upper half and keeps the final layer dense)."""
        layers = self.explicit_layers() or list(range(n_layer - 1 - n_layer // 2, n_layer - 1))
        if not layers:
            raise ValueError(f"a {n_layer}-layer model has no default layers to route: pass --skip_layers")
        if layers[-1] >= n_layer:
            raise ValueError(f"--skip_layers {self.skip_layers!r} names layer {layers[-1]}, "
                             f"but the model has layers 0..{n_layer - 1}")
        return layers


class MindSkipCache:
    """Generation state: KV caches and the gate decisions made on the prompt. It lives here,
    never on the module, so nothing carries over from one prompt to the next."""

    def __init__(self, decisions=None):
        # layer -> KVCache over the rows whose gate is open (sequence level), or
        # layer -> {row: KVCache over that row's open tokens} (token level). A layer whose
        # gated attention never ran has no entry at all.
        self.kv = {}
        # layer -> (B,) bool, made at prefill (sequence level). Pass your own to replay them.
        self.decisions = dict(decisions or {})

    def nbytes(self):
        caches = [c for v in self.kv.values() for c in (v.values() if isinstance(v, dict) else [v])]
        return sum(c.nbytes() for c in caches)


class MindSkipGPT(GPT):
    starts_from_dense = True  # router-tuning tunes a trained dense model
    default_train_samples = 1000  # the paper tunes on about 1,000 samples (--train_samples changes it)

    def __init__(self, config, vcfg):
        super().__init__(config)
        self.vcfg = vcfg
        self.routed = vcfg.routed_layers(config.n_layer)
        self.routers = nn.ModuleDict({str(i): nn.Linear(config.n_embd, 1, bias=False) for i in self.routed})
        for router in self.routers.values():
            nn.init.zeros_(router.weight)  # sigmoid(0) = 0.5 opens every gate: starts exactly dense
        self.loss_weights = {"sparsity": vcfg.sparsity_coef}
        self.last_capacity = None  # share of gates open in the last forward; for logging, never for routing
        self.last_open = None

    @classmethod
    def from_dense(cls, dense, vcfg):
        """Copy a trained GPT's weights, add zero routers, and freeze everything but the routers."""
        model = cls(dataclasses.replace(dense.config), vcfg)
        missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("routers.") for k in missing), (missing, unexpected)
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("routers.")
        return model.to(dense.lm_head.weight.device)

    def checkpoint_state_dict(self):
        """Only the routers: the backbone lives in the base checkpoint."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("routers.")}

    def new_cache(self, decisions=None):
        return MindSkipCache(decisions)

    # --- forward -------------------------------------------------------------------------

    def forward_trunk(self, x, cache=None):
        gates = []
        for i, block in enumerate(self.transformer.h):
            if i not in self.routed:
                x = block(x, None if cache is None else cache.kv.setdefault(i, KVCache()))
                continue
            if self.vcfg.skip == "mlp":  # attention runs as usual; the gate sits on the MLP after it
                x = x + block.attn_update(x, None if cache is None else cache.kv.setdefault(i, KVCache()))
            norm = block.ln_2 if self.vcfg.skip == "mlp" else block.ln_1  # the router reads the gated sublayer's input
            writes_kv = self.vcfg.skip != "mlp"
            if self.vcfg.router_level == "sequence":
                gate = self.sequence_gate(i, norm, x, cache)
                x = self.apply_sequence_gate(i, block, x, gate, cache if writes_kv else None)
            else:
                gate = straight_through_gate(self.routers[str(i)](norm(x)).squeeze(-1), self.vcfg.gate_threshold)
                x = self.apply_token_gate(i, block, x, gate, cache if writes_kv else None)
            if self.vcfg.skip == "attn":
                x = x + block.mlp_update(x)
            gates.append(gate)
        self.last_open = [g.detach() > 0 for g in gates]  # per gated layer: (B,) or (B, T); for depth_per_token
        gates = torch.cat([g.flatten() for g in gates])
        self.last_capacity = gates.detach().mean()
        return x, {"sparsity": capacity_hinge(gates, self.vcfg.target_capacity)}

    def gated_sublayer(self, block, x, g, kv):
        """x + g * f(x) for the sublayer --skip names; g broadcasts over x's rows and tokens."""
        if self.vcfg.skip == "attn":
            return x + g * block.attn_update(x, kv)
        if self.vcfg.skip == "mlp":
            return x + g * block.mlp_update(x)
        # block: one g on both sublayers. For g in {0, 1} this is x + g * (Block(x) - x), and
        # with g = 1 it gives the dense block's bits exactly (x + (Block(x) - x) would not)
        x = x + g * block.attn_update(x, kv)
        return x + g * block.mlp_update(x)

    def sequence_gate(self, i, norm, x, cache):
        """(B,) gate of layer i: decided from the mean LN output, or replayed from the cache."""
        if cache is not None and i in cache.decisions:
            return cache.decisions[i].to(x.dtype)  # decided on the prompt; decode steps reuse it
        # the mean covers the whole input: at training and evaluation the decision sees the full
        # sequence (as in the paper); when generating, it sees the prompt only
        score = self.routers[str(i)](norm(x).mean(dim=1)).squeeze(-1)
        gate = straight_through_gate(score, self.vcfg.gate_threshold)
        if cache is not None:
            cache.decisions[i] = gate.detach() > 0
        return gate

    def apply_sequence_gate(self, i, block, x, gate, cache):
        """Gate each row. Closed rows are not computed, except when a backward pass may follow:
        the straight-through gradient of a closed gate needs f(x) (0 * f(x) adds nothing)."""
        open_rows = gate.detach() > 0
        if (torch.is_grad_enabled() and cache is None) or open_rows.all():
            kv = None if cache is None else cache.kv.setdefault(i, KVCache())
            return self.gated_sublayer(block, x, gate[:, None, None], kv)
        if not open_rows.any():
            return x  # the sublayer does no work and leaves no cache
        rows = open_rows.nonzero().squeeze(1)
        # decisions are fixed for a whole generation, so this cache always holds the same rows
        kv = None if cache is None else cache.kv.setdefault(i, KVCache())
        return x.index_copy(0, rows, self.gated_sublayer(block, x[rows], gate[rows, None, None], kv))

    def apply_token_gate(self, i, block, x, gate, cache):
        """Gate each token. Open tokens are gathered, each row on its own (rows open different
        numbers of tokens), so a closed token is neither a query nor a key in this layer; it
        gets no LM gradient, only the hinge's."""
        open_tokens = gate.detach() > 0  # (B, T)
        if cache is None and open_tokens.all():
            return self.gated_sublayer(block, x, gate[..., None], None)
        x = x.clone()
        for b in range(x.size(0)):
            idx = open_tokens[b].nonzero().squeeze(1)  # ascending: keeps causal order
            if idx.numel() == 0:
                continue
            kv = None if cache is None else cache.kv.setdefault(i, {}).setdefault(b, KVCache())
            x[b, idx] = self.gated_sublayer(block, x[b, idx][None], gate[b, idx, None], kv)[0]
        return x

    @torch.no_grad()
    def evaluate(self, idx, targets):
        """Val loss and the realised capacity: the share of gated sublayers (per sequence or per
        token) that were open."""
        _, loss, _ = self(idx, targets)
        return {"loss": loss.item(), "capacity": self.last_capacity.item()}

    @torch.no_grad()
    def depth_per_token(self, idx, prompt_len):
        """(B, T) share of the sublayers (attention and MLP of every layer) each token went
        through: sequence gates as generation decides them, on the prompt; token gates token by
        token (read in block_size windows)."""
        skipped_per_gate = 2 if self.vcfg.skip == "block" else 1
        n_sublayers = 2 * self.config.n_layer
        if self.vcfg.router_level == "sequence":
            cache = self.new_cache()
            self(idx[:, :prompt_len][:, -self.config.block_size:], cache=cache)
            closed = sum((~d).float() for d in cache.decisions.values())  # (B,)
            return (1 - skipped_per_gate * closed[:, None] / n_sublayers).expand(idx.shape).cpu()
        depths = []
        for start in range(0, idx.size(1), self.config.block_size):
            self(idx[:, start:start + self.config.block_size])
            closed = sum((~o).float() for o in self.last_open)  # (B, window)
            depths.append(1 - skipped_per_gate * closed.cpu() / n_sublayers)
        return torch.cat(depths, dim=1)

    # --- cost ----------------------------------------------------------------------------

    def flops_per_token(self, seq_len=None, capacity=None):
        """Training FLOPs/token (DESIGN.md convention) when `capacity` of the routed sublayers
        are open (default: the target capacity, not a measurement). A skipped sublayer costs
        nothing; at token level an open token attends over only capacity * T keys."""
        T = seq_len or self.config.block_size
        c = self.vcfg.target_capacity if capacity is None else capacity
        d = self.config.n_embd
        attn_weights = 4 * d * d  # c_attn 3d^2 + c_proj d^2
        weights = {"attn": attn_weights, "mlp": block_matmul_params(d) - attn_weights, "block": block_matmul_params(d)}
        gated_weights = weights[self.vcfg.skip]
        gated_attention = 0 if self.vcfg.skip == "mlp" else attention_flops(d, T)
        key_share = c if self.vcfg.router_level == "token" else 1.0
        full = 6 * gated_weights + gated_attention
        used = c * (6 * gated_weights + key_share * gated_attention) + 6 * d  # + the router
        return super().flops_per_token(T) - len(self.routed) * (full - used)
