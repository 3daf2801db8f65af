"""
Router-Tuning with MindSkip (He et al. 2024, arXiv 2410.13184).

MindSkip puts a skip gate on the attention sublayer of some layers of a trained model:

    s = w . mean_t LN_1(x)_t                      one score per sequence (w zero-initialised)
    g = 1[sigmoid(s) >= 0.5]                      forward; d g / d s = sigmoid'(s) backward
    x <- x + g * Attn(LN_1(x))

A closed gate (g = 0) means the sublayer is not computed at all and, when generating, writes
no KV cache. The gate (router.MindSkipGate) can decide per token instead of per sequence.
The official code gates attention only; gating the MLP (x + g * MLP(LN_2(x))) or the whole
block (--skip mlp | block) is this project's extension.

Router-tuning freezes every weight of the trained model and trains only the routers w on a
small slice of its pretraining text (the paper tunes on instruction data with the prompt
masked out; we tune on the same kind of text the base was trained on) with

    loss = LM loss + lambda * (mean(g) - target_capacity)^2          --sparsity target (default)
    loss = LM loss + lambda * sum over gated layers of mean(g)       --sparsity official

The two-sided penalty pulls the share of open gates to the target from either side; the
official term has no target and only pushes gates shut. With --sparsity target, one offset b
is added to every score, s + b, and after each tuning step b is set so that the routers open
exactly the target share of the gates of the last 1,024 inputs they read (this project's; the
paper's routers have neither a bias nor a target). While tuning, a closed gate's
sublayer is still computed (times 0), so the LM loss reaches closed gates straight-through
and can reopen them; the official code skips closed sequences in training too, so a gate
it closes hears only the sparsity term. Zero-initialised routers give sigmoid(0) = 0.5 >= 0.5:
tuning starts from the dense model.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from model import GPT, KVCache, attention_flops, block_matmul_params
from router import MindSkipGate, capacity_penalty, gate_sum_sparsity, pack_mask

RECENT_INPUTS = 1024  # router inputs kept per gated layer for the offset: ~the default tuning set
TUNED_BUFFERS = ("score_offset", "recent_inputs", "recent_count")  # saved with the routers


@dataclass
class MindSkipConfig:
    skip: str = "attn"  # attn | mlp | block: the sublayer each routed layer may skip
    skip_layers: str = ""  # comma list of 0-based layers to route, e.g. "2,3,4"; "" = upper half minus the last (12 layers: 5-10)
    router_level: str = "sequence"  # sequence: one gate per sequence from the mean LN output | token: one per token (causal)
    target_capacity: float = 0.5  # share of gated sublayers that should stay open (--sparsity target)
    sparsity: str = "target"  # target: lambda * (mean g - target)^2 | official: lambda * sum over layers of mean g
    sparsity_coef: float = 50.0  # lambda (the official code calls it gradient_scale)
    gate_threshold: float = 0.5  # gate opens iff sigmoid(score) >= this; 0 forces open, > 1 forces closed

    def __post_init__(self):
        if self.skip not in ("attn", "mlp", "block"):
            raise ValueError(f"--skip must be attn, mlp or block, got {self.skip!r}")
        if self.router_level not in ("sequence", "token"):
            raise ValueError(f"--router_level must be sequence or token, got {self.router_level!r}")
        if not 0 <= self.target_capacity <= 1:
            raise ValueError(f"--target_capacity must be in [0, 1], got {self.target_capacity}")
        if self.sparsity not in ("target", "official"):
            raise ValueError(f"--sparsity must be target or official, got {self.sparsity!r}")
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
        before the last one (as the paper and its code). The last layer is never gated: the
        official code keeps it dense, and we refuse a list that names it."""
        layers = self.explicit_layers() or list(range(n_layer - 1 - n_layer // 2, n_layer - 1))
        if not layers:
            raise ValueError(f"a {n_layer}-layer model has no default layers to route: pass --skip_layers")
        if layers[-1] >= n_layer:
            raise ValueError(f"--skip_layers {self.skip_layers!r} names layer {layers[-1]}, "
                             f"but the model has layers 0..{n_layer - 1}")
        if layers[-1] == n_layer - 1:
            raise ValueError(f"--skip_layers {self.skip_layers!r} gates the last layer ({n_layer - 1}), "
                             f"which stays dense: choose among layers 0..{n_layer - 2}")
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

    def __init__(self, config, settings):
        super().__init__(config)
        self.settings = settings
        self.routed = settings.routed_layers(config.n_layer)
        self.routers = nn.ModuleDict({str(i): MindSkipGate(config.n_embd, settings.router_level,
                                                           settings.gate_threshold) for i in self.routed})
        self.loss_weights = {"sparsity": settings.sparsity_coef}
        # added to every gate's score; follows the target while tuning (see follow_target)
        self.register_buffer("score_offset", torch.zeros(()))
        # the last RECENT_INPUTS tuning inputs of each router (a ring) and how many were written;
        # buffers, so that resuming continues with them
        ring = torch.zeros(len(self.routed), RECENT_INPUTS, config.n_embd)
        self.register_buffer("recent_inputs", ring)
        self.register_buffer("recent_count", torch.zeros((), dtype=torch.long))
        self.pending_inputs = []  # this step's router inputs, (layers, rows, d) per micro-batch
        self.last_capacity = None  # share of gates open in the last forward; for logging, never for routing
        self.last_open = None

    @classmethod
    def from_dense(cls, dense, settings):
        """Copy a trained GPT's weights, add zero routers, and freeze everything but the routers."""
        model = cls(dataclasses.replace(dense.config), settings)
        missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("routers.") or k in TUNED_BUFFERS for k in missing)
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("routers.")
        return model.to(dense.lm_head.weight.device)

    def checkpoint_state_dict(self):
        """Only the routers: the backbone lives in the base checkpoint."""
        return {k: v for k, v in self.state_dict().items() if k.startswith("routers.") or k in TUNED_BUFFERS}

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW over the routers with no weight decay, whatever --weight_decay says: decay pulls
        every score towards 0, where sigmoid(0) = 0.5 opens the gate (the official recipe uses 0)."""
        optimizer = torch.optim.AdamW(self.routers.parameters(), lr=learning_rate, betas=betas, weight_decay=0.0)
        optimizer.register_step_post_hook(lambda *_: self.follow_target())
        return optimizer

    def new_cache(self, decisions=None):
        return MindSkipCache(decisions)

    # --- forward -------------------------------------------------------------------------

    def forward_trunk(self, x, cache=None):
        """model.train() is the tuning forward: every gated sublayer is computed and multiplied by
        its gate, so a closed gate still gets the LM loss's straight-through gradient.
        model.eval() skips what closed gates close, and with a cache writes no KV for it."""
        if self.training and cache is not None:
            raise ValueError("generating with a cache needs model.eval(): tuning computes closed sublayers too")
        skip, gates, router_inputs = self.settings.skip, [], []
        for i, block in enumerate(self.transformer.h):
            if i not in self.routed:
                x = block(x, self.layer_cache(cache, i))
                continue
            if skip == "mlp":  # attention runs as usual; the gate sits on the MLP after it
                x = x + block.attn_update(x, self.layer_cache(cache, i))
            h = (block.ln_2 if skip == "mlp" else block.ln_1)(x)  # the gated sublayer's input; its router reads it too
            gate, _ = self.gate(i, h, cache)
            router_inputs.append(h)
            if self.training:
                x = self.gated_sublayer(block, x, h, gate[:, None, None] if gate.dim() == 1 else gate[..., None], None)
            elif self.settings.router_level == "sequence":
                x = self.skip_closed_rows(i, block, x, h, gate, cache)
            else:
                x = self.skip_closed_tokens(i, block, x, h, gate, cache)
            if skip == "attn":
                x = x + block.mlp_update(x)
            gates.append(gate)
        self.last_open = [g.detach() > 0 for g in gates]  # per gated layer: (B,) or (B, T); for depth_per_token
        every_gate = torch.cat([g.flatten() for g in gates])
        self.last_capacity = every_gate.detach().mean()
        if self.follows_target():
            self.record_for_target(router_inputs)
        if self.settings.sparsity == "official":
            return x, {"sparsity": gate_sum_sparsity(gates)}
        return x, {"sparsity": capacity_penalty(every_gate, self.settings.target_capacity)}

    def layer_cache(self, cache, i):
        """Layer i's KVCache when every row writes to it (ungated attention)."""
        return None if cache is None else cache.kv.setdefault(i, KVCache())

    def gate(self, i, h, cache):
        """Layer i's gate on h, the gated sublayer's LayerNorm output: (B,) or (B, T) in {0, 1},
        and its scores (None when replayed): a sequence gate is replayed from the cache once the
        prompt has decided it."""
        if cache is not None and i in cache.decisions:
            return cache.decisions[i].float(), None  # decided on the prompt; decode steps reuse it
        # at training and evaluation a sequence gate sees the full sequence (as in the paper);
        # when generating, it sees the prompt only
        gate, score = self.routers[str(i)](h, self.score_offset)
        if cache is not None and self.settings.router_level == "sequence":
            cache.decisions[i] = gate.detach() > 0
        return gate, score

    def follows_target(self):
        """True in a tuning forward with --sparsity target and a threshold that can go either way."""
        return self.training and self.settings.sparsity == "target" and 0 < self.settings.gate_threshold < 1

    @torch.no_grad()
    def record_for_target(self, router_inputs):
        """Set aside what each router read in this forward, for the ring of recent inputs:
        every row at sequence level, a spread of tokens at token level (so that the ring
        spans many sequences), the same positions for every micro-batch of a step."""
        rows = [(h.mean(dim=1) if self.settings.router_level == "sequence" else h).flatten(0, -2)
                for h in router_inputs]
        n = rows[0].size(0)
        # a prime stride spreads the sample over rows and positions, the count moves it each step;
        # tensor arithmetic only, so a compiled forward stays one graph
        step = torch.arange(min(n, RECENT_INPUTS // 16), device=rows[0].device) * 7919
        take = (step + self.recent_count) % n
        self.pending_inputs.append(torch.stack([r[take] for r in rows]).float())

    @torch.no_grad()
    def follow_target(self):
        """After every optimizer step (a hook from configure_optimizers): put the step's inputs
        (of every process, in micro-batch order) in the ring, then set the offset so that the
        current routers open exactly target_capacity of the gates on the ring's inputs (all
        gated layers together, so the routers still choose which layers and rows stay open).
        Like BatchNorm's running statistics it follows the training batches and is frozen in
        eval mode. Scoring stored inputs with the current routers, not past scores, keeps it
        exact however fast the routers move: a running correction of the offset lagged behind
        them and left tunings of 50-100 steps 0.05-0.24 off target."""
        if self.pending_inputs:
            kept, self.pending_inputs = torch.cat(self.pending_inputs, dim=1), []
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                parts = [torch.empty_like(kept) for _ in range(torch.distributed.get_world_size())]
                torch.distributed.all_gather(parts, kept)
                kept = torch.cat(parts, dim=1)
            kept = kept[:, -RECENT_INPUTS:]
            where = self.recent_count + torch.arange(kept.size(1), device=kept.device)
            self.recent_inputs[:, where % RECENT_INPUTS] = kept
            self.recent_count += kept.size(1)
        # quantile calibration on the recent inputs: exact for the current routers, no gain to tune
        filled = min(int(self.recent_count), RECENT_INPUTS)
        if filled == 0:  # no tuning forward has recorded (or the settings never record)
            return
        weights = torch.stack([self.routers[str(i)].weight[0] for i in self.routed]).float()
        scores = torch.einsum("lnd,ld->ln", self.recent_inputs[:, :filled], weights).flatten()
        threshold = math.log(self.settings.gate_threshold / (1 - self.settings.gate_threshold))
        closed = 1 - self.settings.target_capacity
        boundary = torch.quantile(scores, closed, interpolation="midpoint")  # target share above it
        self.score_offset.fill_(threshold - boundary)

    def gated_sublayer(self, block, x, h, g, kv):
        """x + g * f(x) for the sublayer --skip names, f reading h = its LayerNorm of x (computed
        once for the router and the sublayer); g broadcasts over x's rows and tokens."""
        if self.settings.skip == "attn":
            return x + g * block.attn(h, kv)
        if self.settings.skip == "mlp":
            return x + g * block.mlp(h)
        # block: one g on both sublayers. For g in {0, 1} this is x + g * (Block(x) - x), and
        # with g = 1 it gives the dense block's bits exactly (x + (Block(x) - x) would not)
        x = x + g * block.attn(h, kv)
        return x + g * block.mlp_update(x)

    def skip_closed_rows(self, i, block, x, h, gate, cache):
        """Sequence gates at inference: when every row agrees the sublayer runs on the whole
        batch or not at all; otherwise only the open rows are selected and computed."""
        open_rows = gate > 0  # (B,)
        kv_layer = cache is not None and self.settings.skip != "mlp"
        if not open_rows.any():
            return x  # no work and no cache
        kv = self.layer_cache(cache, i) if kv_layer else None
        if open_rows.all():
            return self.gated_sublayer(block, x, h, 1.0, kv)
        # decisions are fixed for a whole generation, so this cache always holds the same rows
        rows = open_rows.nonzero().squeeze(1)
        return x.index_copy(0, rows, self.gated_sublayer(block, x.index_select(0, rows), h.index_select(0, rows), 1.0, kv))

    def skip_closed_tokens(self, i, block, x, h, gate, cache):
        """Token gates at inference. Open tokens are gathered, each row on its own (rows open
        different numbers of tokens), so a closed token is neither a query nor a key here."""
        open_tokens = gate > 0  # (B, T)
        kv_layer = cache is not None and self.settings.skip != "mlp"
        if not kv_layer and open_tokens.all():
            return self.gated_sublayer(block, x, h, 1.0, None)
        if not kv_layer:  # no cache to write: every row's open tokens packed into one batched pass
            return self.skip_closed_tokens_packed(block, x, h, open_tokens)
        x = x.clone()
        for b in range(x.size(0)):
            idx = open_tokens[b].nonzero().squeeze(1)  # ascending: keeps causal order
            if idx.numel() == 0:
                continue
            kv = cache.kv.setdefault(i, {}).setdefault(b, KVCache()) if kv_layer else None
            x[b, idx] = self.gated_sublayer(block, x[b, idx][None], h[b, idx][None], 1.0, kv)[0]
        return x

    def skip_closed_tokens_packed(self, block, x, h, open_tokens):
        """Each row's open tokens first, in causal order, padding after them (so no real token
        sees padding), one sublayer pass over the (B, most open) batch, and the open rows
        written back: one gather and one index_copy instead of a forward per row."""
        B, T, C = x.shape
        if not open_tokens.any():
            return x
        order, valid = pack_mask(open_tokens)  # (B, m)
        rows = (order + T * torch.arange(B, device=x.device)[:, None]).flatten()
        x_flat, h_flat = x.reshape(B * T, C), h.reshape(B * T, C)
        new = self.gated_sublayer(block, x_flat.index_select(0, rows).view(B, -1, C),
                                  h_flat.index_select(0, rows).view(B, -1, C), 1.0, None)
        real = valid.flatten()
        return x_flat.index_copy(0, rows[real], new.reshape(-1, C)[real]).view(B, T, C)

    @torch.no_grad()
    def evaluate(self, idx, targets):
        """Val loss and the realised capacity: the share of gated sublayers (per sequence or per
        token) that were open."""
        _, loss, _ = self(idx, targets)
        return {"loss": loss.item(), "capacity": self.last_capacity.item()}

    # --- generation ----------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, cache=None):
        """As GPT.generate. Without a cache, sequence gates still decide as cached generation
        does: on the prompt, and again on the window wherever the cached path starts a fresh
        cache (once the text fills block_size); each step recomputes the window with them."""
        if use_cache or self.settings.router_level == "token":  # token gates are causal already
            return super().generate(idx, max_new_tokens, temperature, top_k, use_cache, cache)
        decisions, seen = None, 0  # seen: the tokens the cached path's cache would hold
        for _ in range(max_new_tokens):
            window = idx[:, -self.config.block_size:]
            decide = decisions is None or seen >= self.config.block_size
            seen = window.size(1) if decide else seen + 1
            # one step of GPT.generate on a throwaway cache: it runs the whole window once
            step_cache = self.new_cache(None if decide else decisions)
            step = super().generate(window, 1, temperature, top_k, use_cache=True, cache=step_cache)
            decisions = step_cache.decisions
            idx = torch.cat((idx, step[:, -1:]), dim=1)
        return idx

    @torch.no_grad()
    def depth_per_token(self, idx, prompt_len):
        """(B, T) share of the sublayers (attention and MLP of every layer) each token went
        through: sequence gates as generation decides them, on the prompt; token gates token by
        token (read in block_size windows)."""
        skipped_per_gate = 2 if self.settings.skip == "block" else 1
        n_sublayers = 2 * self.config.n_layer
        if self.settings.router_level == "sequence":
            cache = self.new_cache()
            self(idx[:, :prompt_len][:, -self.config.block_size:], cache=cache)
            closed = sum((~d).float() for d in cache.decisions.values())  # (B,)
            return (1 - skipped_per_gate * closed[:, None] / n_sublayers).expand(idx.shape).cpu()
        depths = []
        for window in self.context_windows(idx):
            self(window)
            closed = sum((~o).float() for o in self.last_open)  # (B, window)
            depths.append(1 - skipped_per_gate * closed.cpu() / n_sublayers)
        return torch.cat(depths, dim=1)

    # --- cost ----------------------------------------------------------------------------

    def gated_costs(self, T):
        """(matmul weights, attention FLOPs per token over T keys) of one gated sublayer."""
        d = self.config.n_embd
        attn_weights = 4 * d * d  # c_attn 3d^2 + c_proj d^2
        weights = {"attn": attn_weights, "mlp": block_matmul_params(d) - attn_weights, "block": block_matmul_params(d)}
        return weights[self.settings.skip], (0 if self.settings.skip == "mlp" else attention_flops(d, T))

    def flops_per_token(self, seq_len=None):
        """FLOPs per token of a router-tuning step: the FLOP convention (6 x matmul weights +
        12 d T per attended layer) for a frozen backbone. Frozen weights need no gradient, so a
        matmul costs 4 x its weights (forward + its input's gradient); attention keeps 12 d T
        (its backward has no weights). Sublayers up to the first gate need no backward at all
        (2 x weights + 4 d T). Tuning computes every gated sublayer whatever its gate says, so
        this does not depend on the capacity; a router costs 6 x its d weights."""
        T = seq_len or self.config.block_size
        d, V = self.config.n_embd, self.config.vocab_size
        sublayers = [(4 * d * d, attention_flops(d, T)), (8 * d * d, 0)] * self.config.n_layer  # attn, mlp, ...
        first_gate = 2 * min(self.routed) + (self.settings.skip == "mlp")  # gradients start after it
        total = sum(2 * w + a / 3 if s <= first_gate else 4 * w + a for s, (w, a) in enumerate(sublayers))
        return total + 4 * d * V + 6 * d * len(self.routed)

    def inference_flops_per_token(self, seq_len=None, capacity=None):
        """Forward FLOPs per token (a third of the training convention) when `capacity` of the
        gated sublayers are open (default: the target capacity, not a measurement). A skipped
        sublayer costs nothing; at token level an open token attends over capacity * T keys."""
        T = seq_len or self.config.block_size
        c = self.settings.target_capacity if capacity is None else capacity
        weights, attention = self.gated_costs(T)
        key_share = c if self.settings.router_level == "token" else 1.0
        saved = (1 - c) * 6 * weights + (attention - c * key_share * attention)
        return (GPT.flops_per_token(self, T) - len(self.routed) * saved + 6 * self.config.n_embd * len(self.routed)) / 3
