"""
Router-Tuning with MindSkip (He et al. 2024, arXiv 2410.13184). The method is Router-Tuning
(variant `router_tuning`); the module it trains is MindSkip, hence this file and MindSkipGPT.

MindSkip puts a skip gate on the attention sublayer of some layers of a trained model:

    s = w . mean_t LN_1(x)_t                      one score per sequence (w zero-initialised)
    g = 1[sigmoid(s + b) >= tau]                  forward; d g / d s = sigmoid'(s + b) backward
    x <- x + g * Attn(LN_1(x))

tau is --gate_threshold (0.5). At inference a closed gate (g = 0) means the sublayer is not
computed at all and, when generating, writes no KV cache. The gate (router.MindSkipGate) can
decide per token instead of per sequence. The official code gates attention only; gating the MLP
(x + g * MLP(LN_2(x))) or the whole block (--skip mlp | block) is this project's extension.

Router-tuning freezes every weight of the trained model and trains only the routers w:

    loss = LM loss + lambda * (mean(g) - target_capacity)^2          --sparsity target (default)
    loss = LM loss + lambda * sum over gated layers of mean(g)       --sparsity official

With --sparsity target, one offset b is added to every score, and after each tuning step b
is set so that the current routers open exactly the target share of the gates on the inputs
of the last 16 steps (this project's; the paper's routers have neither a bias nor a target).
While tuning, a closed gate's sublayer is still computed (times 0), so the LM loss reaches it
straight-through. Zero routers give sigmoid(0) = 0.5: tuning starts from the dense model.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from model import GPT, KVCache, RowKVCache, attention_flops, block_matmul_params, copy_weights
from router import MindSkipGate, capacity_penalty, flat_rows, gate_sum_sparsity, pack_mask

RECENT_INPUTS = 1024  # router inputs kept per gated layer (a ring, saved with the routers)
RECENT_STEPS = 16  # the offset reads the last 16 steps' inputs: older ones saw other gates below
TUNED_BUFFERS = ("score_offset", "recent_inputs", "recent_count")  # saved with the routers


@dataclass
class MindSkipConfig:
    skip: str = "attn"  # attn | mlp | block: the sublayer each gated layer may skip
    skip_layers: str = ""  # 0-based layers to gate, e.g. "2,3,4"; "": upper half minus the last
    router_level: str = "sequence"  # sequence: one gate per sequence | token: one per token
    target_capacity: float = 0.5  # share of gated sublayers that should stay open
    sparsity: str = "target"  # target: lambda (mean g - target)^2 | official: lambda sum mean g
    sparsity_coef: float = 50.0  # lambda (the official code calls it gradient_scale)
    gate_threshold: float = 0.5  # open iff sigmoid(score) >= this; 0 forces open, > 1 closed

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
            raise ValueError(f"--skip_layers must be comma-separated layer numbers like 3,4,5, "
                             f"got {self.skip_layers!r}")
        layers = [int(p) for p in parts]
        if len(set(layers)) != len(layers):
            raise ValueError(f"--skip_layers lists a layer twice: {self.skip_layers!r}")
        return sorted(layers)

    def gated_layers(self, n_layer):
        """Layers that get a gate in an n_layer model. Default: n_layer // 2 layers ending just
        before the last one (as the paper and its code). The last layer is never gated: the
        official code keeps it dense, and we refuse a list that names it."""
        layers = self.explicit_layers() or list(range(n_layer - 1 - n_layer // 2, n_layer - 1))
        if not layers:
            raise ValueError(f"a {n_layer}-layer model has no default layers to route: "
                             f"pass --skip_layers")
        if layers[-1] >= n_layer:
            raise ValueError(f"--skip_layers {self.skip_layers!r} names layer {layers[-1]}, "
                             f"but the model has layers 0..{n_layer - 1}")
        if layers[-1] == n_layer - 1:
            raise ValueError(f"--skip_layers {self.skip_layers!r} gates the last layer "
                             f"({n_layer - 1}), which stays dense: choose among layers "
                             f"0..{n_layer - 2}")
        return layers


class MindSkipCache:
    """Generation state: KV caches and the gate decisions made on the prompt. It lives here,
    never on the module, so nothing carries over from one prompt to the next."""

    def __init__(self, decisions=None):
        # layer -> KVCache over the rows whose gate is open (sequence level), or a RowKVCache
        # over each row's open tokens (token level); a gated attention that never ran: none
        self.kv = {}
        # layer -> (B,) bool, made at prefill (sequence level). Pass your own to replay them.
        self.decisions = dict(decisions or {})

    def nbytes(self):
        return sum(c.nbytes() for c in self.kv.values())


class MindSkipGPT(GPT):
    starts_from_dense = True  # router-tuning tunes a trained dense model
    tuning_samples = 1000  # the paper tunes on about 1,000 sequences, one epoch

    def __init__(self, config, settings):
        super().__init__(config)
        self.settings = settings
        self.gated = settings.gated_layers(config.n_layer)
        self.routers = nn.ModuleDict({
            str(i): MindSkipGate(config.n_embd, settings.router_level, settings.gate_threshold)
            for i in self.gated})
        self.loss_weights = {"sparsity": settings.sparsity_coef}
        # added to every gate's score; follows the target while tuning (step_score_offset)
        self.register_buffer("score_offset", torch.zeros(()))
        # the last RECENT_INPUTS tuning inputs of each router (a ring) and how many were written
        ring = torch.zeros(len(self.gated), RECENT_INPUTS, config.n_embd)
        self.register_buffer("recent_inputs", ring)
        self.register_buffer("recent_count", torch.zeros((), dtype=torch.long))
        self.pending_inputs = []  # this step's router inputs, (layers, rows, d) per micro-batch
        self.last_capacity = None  # share of gates open in the last forward; for logging
        self.last_open = None  # per gated layer: (B,) or (B, T) bool; for depth_per_token

    @classmethod
    def from_dense(cls, dense, settings):
        """Copy a trained GPT's weights, add zero routers, freeze everything but the routers."""
        model = cls(dataclasses.replace(dense.config), settings)
        copy_weights([(model.transformer, dense.transformer), (model.lm_head, dense.lm_head)])
        for name, p in model.named_parameters():
            p.requires_grad = name.startswith("routers.")
        return model.to(dense.lm_head.weight.device)

    @classmethod
    def train_defaults(cls, cfg):
        """The paper's recipe: one epoch over tuning_samples windows (--train_samples), 3% warmup,
        cosine decay to 0 at the end."""
        samples = cfg.train_samples or cls.tuning_samples
        steps = math.ceil(samples / (cfg.batch_size * cfg.gradient_accumulation_steps))
        return {"train_samples": samples, "max_iters": steps, "lr_decay_iters": steps,
                "warmup_iters": math.ceil(0.03 * steps), "min_lr": 0.0}

    def checkpoint_state_dict(self):
        """Only the routers and their offset's state: the backbone lives in the base checkpoint."""
        return {k: v for k, v in self.state_dict().items()
                if k.startswith("routers.") or k in TUNED_BUFFERS}

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW over the routers with no weight decay, whatever --weight_decay says: decay pulls
        every score towards 0, where sigmoid(0) = 0.5 opens the gate (the official recipe: 0)."""
        optimizer = torch.optim.AdamW(self.routers.parameters(), lr=learning_rate, betas=betas,
                                      weight_decay=0.0)
        optimizer.register_step_post_hook(lambda *_: self.step_score_offset())
        return optimizer

    def new_cache(self, decisions=None):
        return MindSkipCache(decisions)

    # --- forward: one layer ------------------------------------------------------------------

    def forward_trunk(self, x, cache=None):
        """model.train() tunes (forward_tuning); model.eval() skips what closed gates close."""
        if not self.training:
            return self.forward_inference(x, cache)
        if cache is not None:
            raise ValueError("generating with a cache needs model.eval(): tuning computes "
                             "closed sublayers too")
        return self.forward_tuning(x)

    def run_layers(self, x, cache, through_gate):
        """Every layer in order, a gated one's gate run by through_gate: (x, gates, scores)."""
        gates, scores = [], []
        for i, block in enumerate(self.transformer.h):
            if i not in self.gated:
                x = block(x, self.layer_cache(cache, i))
                continue
            x, gate, score = self.gated_layer(i, block, x, cache, through_gate)
            gates.append(gate)
            scores.append(score)
        return x, gates, scores

    def gated_layer(self, i, block, x, cache, through_gate):
        """Layer i, its --skip sublayer behind the gate: through_gate(i, block, x, h, cache) runs
        x + g * f(x) the mode's way, h being the sublayer's LayerNorm output (the router's input
        too). The ungated sublayer runs around it: attention before a gated MLP, the MLP after a
        gated attention."""
        if self.settings.skip == "mlp":
            x = x + block.attn_update(x, self.layer_cache(cache, i))
            return through_gate(i, block, x, block.ln_2(x), cache)
        x, gate, score = through_gate(i, block, x, block.ln_1(x), cache)
        if self.settings.skip == "attn":
            x = x + block.mlp_update(x)
        return x, gate, score

    def gated_sublayer(self, block, x, h, g, kv):
        """x + g * f(x) for the sublayer --skip names, f reading h; g broadcasts over x."""
        if self.settings.skip == "attn":
            return x + g * block.attn(h, kv)
        if self.settings.skip == "mlp":
            return x + g * block.mlp(h)
        # block: one g on both sublayers. For g in {0, 1} this is x + g * (Block(x) - x), and
        # with g = 1 it gives the dense block's bits exactly (x + (Block(x) - x) would not)
        x = x + g * block.attn(h, kv)
        return x + g * block.mlp_update(x)

    def layer_cache(self, cache, i):
        """Layer i's KVCache when every row writes to it (ungated attention)."""
        return None if cache is None else cache.kv.setdefault(i, KVCache())

    def gate_losses(self, gates):
        """The sparsity term of the gates of one forward; remembers their open share."""
        self.last_open = [g.detach() > 0 for g in gates]
        every_gate = torch.cat([g.flatten() for g in gates])
        self.last_capacity = every_gate.detach().mean()
        if self.settings.sparsity == "official":
            return {"sparsity": gate_sum_sparsity(gates)}
        return {"sparsity": capacity_penalty(every_gate, self.settings.target_capacity)}

    # --- forward: tuning -----------------------------------------------------------------------

    def forward_tuning(self, x):
        """x <- x + g * f(x): every gated sublayer is computed and multiplied by its gate, so a
        closed gate still gets the LM loss's straight-through gradient."""
        router_inputs = []

        def gate_and_keep_input(i, block, x, h, cache=None):
            router_inputs.append(h)
            return self.tuning_gate(i, block, x, h, cache)

        x, gates, _ = self.run_layers(x, None, gate_and_keep_input)
        if self.offset_follows_target():
            self.record_router_inputs(router_inputs)
        return x, self.gate_losses(gates)

    def tuning_gate(self, i, block, x, h, cache=None):
        gate, score = self.routers[str(i)](h, self.score_offset)  # (B,) or (B, T)
        g = gate.reshape(gate.shape + (1,) * (x.dim() - gate.dim()))  # broadcasts over x
        return self.gated_sublayer(block, x, h, g, None), gate, score

    def offset_follows_target(self):
        """True in a tuning forward with --sparsity target and a threshold that can go either
        way: the forwards whose open share moves the score offset."""
        return (self.training and self.settings.sparsity == "target"
                and 0 < self.settings.gate_threshold < 1)

    @torch.no_grad()
    def record_router_inputs(self, router_inputs):
        """Set aside what each router read in this forward, for the ring of recent inputs:
        every row at sequence level, a spread of tokens at token level (so that the ring
        spans many sequences), the same positions for every micro-batch of a step."""
        rows = [(h.mean(dim=1) if self.settings.router_level == "sequence" else h).flatten(0, -2)
                for h in router_inputs]
        n = rows[0].size(0)
        # a prime stride spreads the sample over rows and positions, the count moves it each step;
        # tensor arithmetic only, so a compiled forward stays one graph
        strided = torch.arange(min(n, RECENT_INPUTS // RECENT_STEPS), device=rows[0].device) * 7919
        take = (strided + self.recent_count) % n
        self.pending_inputs.append(torch.stack([r[take] for r in rows]).float())

    @torch.no_grad()
    def step_score_offset(self):
        """After every optimizer step (configure_optimizers' hook): the step's router inputs (of
        every process) go into the ring, and b is set so that the current routers open exactly
        target_capacity of the gates on the last RECENT_STEPS steps' inputs, all gated layers
        together (so the routers still choose which stay open). Frozen in eval, like BatchNorm."""
        if not self.pending_inputs:  # no tuning forward recorded (or the settings never record)
            return
        rows_per_step = self.push_to_ring(torch.cat(self.pending_inputs, dim=1))
        self.pending_inputs = []
        count = int(self.recent_count)
        recent = min(count, RECENT_INPUTS, RECENT_STEPS * rows_per_step)
        newest = torch.arange(count - recent, count, device=self.score_offset.device)
        # a quantile: exact for the current routers (a running correction of b lagged behind them)
        weights = torch.stack([self.routers[str(i)].weight[0] for i in self.gated]).float()
        scores = torch.einsum("lnd,ld->ln", self.recent_inputs[:, newest % RECENT_INPUTS], weights)
        logit_tau = math.log(self.settings.gate_threshold / (1 - self.settings.gate_threshold))
        boundary = torch.quantile(scores.flatten(), 1 - self.settings.target_capacity,
                                  interpolation="midpoint")  # the target share scores above it
        self.score_offset.fill_(logit_tau - boundary)  # logit(tau): the gate's cut

    def push_to_ring(self, kept):
        """kept (layers, rows, d) into the ring, every process's alike; returns its row count."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [torch.empty_like(kept) for _ in range(torch.distributed.get_world_size())]
            torch.distributed.all_gather(parts, kept)
            kept = torch.cat(parts, dim=1)
        kept = kept[:, -RECENT_INPUTS:]
        where = self.recent_count + torch.arange(kept.size(1), device=kept.device)
        self.recent_inputs[:, where % RECENT_INPUTS] = kept
        self.recent_count += kept.size(1)
        return kept.size(1)

    # --- forward: inference --------------------------------------------------------------------

    def forward_inference(self, x, cache=None):
        """x <- x + f(x) where g = 1, x where g = 0: a closed gate's sublayer is not computed
        and, with a cache, writes no KV."""
        sequence = self.settings.router_level == "sequence"
        through_gate = self.open_rows_only if sequence else self.open_tokens_only
        x, gates, _ = self.run_layers(x, cache, through_gate)
        return x, self.gate_losses(gates)

    def sequence_gate(self, i, h, cache):
        """Layer i's sequence gate (B,) and scores: decided on the prompt when generating (and
        kept in the cache for every later token), on the whole sequence otherwise (the paper)."""
        if cache is not None and i in cache.decisions:
            return cache.decisions[i].float(), None
        gate, score = self.routers[str(i)](h, self.score_offset)
        if cache is not None:
            cache.decisions[i] = gate.detach() > 0
        return gate, score

    def open_rows_only(self, i, block, x, h, cache):
        """Sequence gates: when every row agrees the sublayer runs on the whole batch or not at
        all; otherwise only the open rows are selected and computed."""
        gate, score = self.sequence_gate(i, h, cache)
        open_rows = gate > 0  # (B,)
        if not open_rows.any():
            return x, gate, score  # no work and no cache
        kv = self.layer_cache(cache, i) if self.settings.skip != "mlp" else None
        if open_rows.all():
            return self.gated_sublayer(block, x, h, 1.0, kv), gate, score
        # decisions are fixed for a whole generation, so this cache always holds the same rows
        rows = open_rows.nonzero().squeeze(1)
        new = self.gated_sublayer(block, x.index_select(0, rows), h.index_select(0, rows), 1.0, kv)
        return x.index_copy(0, rows, new), gate, score

    def open_tokens_only(self, i, block, x, h, cache):
        """Token gates: only the open tokens go through the sublayer, a closed token being
        neither a query nor a key. With KV to write, row by row into each row's cache."""
        gate, score = self.routers[str(i)](h, self.score_offset)  # (B, T)
        open_tokens = gate > 0
        if cache is None or self.settings.skip == "mlp":
            return self.open_tokens_packed(block, x, h, open_tokens), gate, score
        kv = cache.kv.setdefault(i, RowKVCache())
        return self.open_tokens_per_row(block, x, h, open_tokens, kv), gate, score

    def open_tokens_packed(self, block, x, h, open_tokens):
        """Each row's open tokens first, in causal order, padding after them (so no real token
        sees padding), one sublayer pass over (B, most open), the real rows written back."""
        if open_tokens.all():
            return self.gated_sublayer(block, x, h, 1.0, None)
        if not open_tokens.any():
            return x
        B, T, C = x.shape
        order, valid = pack_mask(open_tokens)  # (B, m)
        rows = flat_rows(order, T)
        x_flat, h_flat = x.reshape(B * T, C), h.reshape(B * T, C)
        x_open = x_flat.index_select(0, rows).view(B, -1, C)
        new = self.gated_sublayer(block, x_open, h_flat.index_select(0, rows).view(B, -1, C),
                                  1.0, None)
        real = valid.flatten()
        return x_flat.index_copy(0, rows[real], new.reshape(-1, C)[real]).view(B, T, C)

    def open_tokens_per_row(self, block, x, h, open_tokens, kv):
        """Row b's open tokens against kv.row(b): rows open different numbers of tokens."""
        x = x.clone()
        for b in range(x.size(0)):
            idx = open_tokens[b].nonzero().squeeze(1)  # ascending: keeps causal order
            if idx.numel():
                x[b, idx] = self.gated_sublayer(block, x[b, idx][None], h[b, idx][None], 1.0,
                                                kv.row(b))[0]
        return x

    @torch.no_grad()
    def evaluate(self, idx, targets):
        """Val loss and the realised capacity: the share of gated sublayers (per sequence or per
        token) that were open."""
        _, loss, _ = self(idx, targets)
        return {"loss": loss.item(), "capacity": self.last_capacity.item()}

    # --- generation ----------------------------------------------------------------------

    def generation_forward(self, idx, cache, seen, use_cache=True):
        """As GPT's. Without the KV cache, sequence gates still decide as cached generation does:
        on the prompt, and again on the window where the cached path would start a fresh cache
        (once the text fills block_size); `cache` then carries only those decisions."""
        if use_cache or self.settings.router_level == "token":  # token gates are causal already
            return super().generation_forward(idx, cache, seen, use_cache)
        decide = cache is None or seen >= self.config.block_size
        window = idx[:, -self.config.block_size:]
        cache = self.new_cache(None if decide else cache.decisions)
        logits = self(window, cache=cache)[0]
        return logits, cache, (window.size(1) if decide else seen + 1)

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
            depth = 1 - skipped_per_gate * closed[:, None] / n_sublayers
            return depth.expand(idx.shape).cpu()
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
        weights = {"attn": attn_weights, "mlp": block_matmul_params(d) - attn_weights,
                   "block": block_matmul_params(d)}
        attention = 0 if self.settings.skip == "mlp" else attention_flops(d, T)
        return weights[self.settings.skip], attention

    def flops_per_token(self, seq_len=None):
        """FLOPs per token of a router-tuning step, frozen backbone: a frozen matmul costs 4 x
        its weights (forward + its input's gradient), attention keeps 12 d T; sublayers up to
        the first gate need no backward (2 x weights + 4 d T). Every gated sublayer is computed
        whatever its gate says, so this does not depend on the capacity; a router costs 6 d."""
        T = seq_len or self.config.block_size
        d, V = self.config.n_embd, self.config.vocab_size
        # (matmul weights, attention FLOPs) of attn, mlp, attn, mlp, ...
        sublayers = [(4 * d * d, attention_flops(d, T)), (8 * d * d, 0)] * self.config.n_layer
        first_gate = 2 * min(self.gated) + (self.settings.skip == "mlp")  # gradients start after
        total = sum(2 * w + a / 3 if s <= first_gate else 4 * w + a
                    for s, (w, a) in enumerate(sublayers))
        return total + 4 * d * V + 6 * d * len(self.gated)

    def inference_flops_per_token(self, seq_len=None, capacity=None):
        """Forward FLOPs per token (a third of the training convention) when `capacity` of the
        gated sublayers are open (default: the target capacity, not a measurement). A skipped
        sublayer costs nothing; at token level an open token attends over capacity * T keys."""
        T = seq_len or self.config.block_size
        c = self.settings.target_capacity if capacity is None else capacity
        weights, attention = self.gated_costs(T)
        key_share = c if self.settings.router_level == "token" else 1.0
        saved = (1 - c) * 6 * weights + (attention - c * key_share * attention)
        routers = 6 * self.config.n_embd * len(self.gated)
        return (GPT.flops_per_token(self, T) - len(self.gated) * saved + routers) / 3
