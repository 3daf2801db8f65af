"""
Mixture-of-Depths (Raposo et al. 2024, arXiv 2404.02258).

Every other block is routed: a router r_i = w . x_i + b scores each token, and only the
k = round(capacity * T) tokens of each sequence with the highest score go through the block:

    x_i <- x_i + sigmoid(r_i) * f(X_routed)_i    if r_i is among the top-k of its sequence
    x_i <- x_i                                   otherwise

f is the block's update without its residual (attention, then MLP), run on the routed tokens
alone, in their original order: a routed token attends only to earlier routed tokens, and a
token that skips the block leaves no key there. The paper multiplies by the raw score r_i; we
squash it with a sigmoid so the scale stays bounded (the auxiliary loss reads sigmoid(r) too).
The paper's router is w . x_i with no bias; ours keeps one (router.py says why).

Top-k over the sequence peeks at the future, so sampling decides token by token instead
(routing_mode "causal"):

    routed_i = sigmoid(r_i) > 0.5            causal_method "aux_loss": BCE(r_i, top-k member)
    routed_i = sigmoid(p(x_i)) > 0.5         causal_method "predictor": p reads stop_grad(x_i)

The routers and their loss live in router.py; this file keeps the block logic, one method per
mode: forward_topk (training), forward_causal (a whole sequence, token-by-token decisions) and
decode (new tokens against a KV cache).
"""

from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn as nn

import kernels
from model import GPT, KVCache, RowKVCache, attention_flops, block_matmul_params, copy_weights
from router import (CausalPredictor, DepthRouter, add_rows_, capacity_to_k, expert_choice_topk,
                    flat_rows, indices_to_mask, pack_mask, threshold_route, topk_bce_loss)


@dataclass
class MoDConfig:
    capacity: float = 0.125  # C: share of each sequence a routed block processes (paper's best)
    route_every: int = 2  # blocks route_every-1, 2*route_every-1, ... route: with 2, 1, 3, 5, ...
    causal_method: str = "aux_loss"  # aux_loss | predictor: what decides token by token
    aux_loss_coef: float = 0.1  # weight of BCE(sigmoid(r), top-k membership) on the router
    predictor_coef: float = 1.0  # weight of the predictor's BCE (sets only its learning speed)
    kernels: str = "torch"  # torch | triton: fused gather+ln_1 and weighted scatter on GPUs

    def __post_init__(self):
        if not 0 < self.capacity <= 1:
            raise ValueError(f"--capacity must be in (0, 1], got {self.capacity}")
        if self.route_every < 1:
            raise ValueError(f"--route_every must be >= 1 (1 routes every block), "
                             f"got {self.route_every}")
        if self.causal_method not in ("aux_loss", "predictor"):
            raise ValueError(f"--causal_method must be aux_loss or predictor, "
                             f"got {self.causal_method!r}")
        if self.aux_loss_coef < 0:
            raise ValueError(f"--aux_loss_coef must be >= 0, got {self.aux_loss_coef}")
        if self.predictor_coef < 0:
            raise ValueError(f"--predictor_coef must be >= 0, got {self.predictor_coef}")
        if self.kernels not in ("triton", "torch"):
            raise ValueError(f"--kernels must be triton or torch, got {self.kernels!r}")


class RoutedBlock(nn.Module):
    """A model.Block that only the routed tokens go through."""

    def __init__(self, block, n_embd, settings):
        super().__init__()
        self.block = block
        self.capacity = settings.capacity
        self.kernel_impl = settings.kernels  # "torch" | "triton" (the module is `kernels`)
        self.router = DepthRouter(n_embd)  # r_i
        with_predictor = settings.causal_method == "predictor"
        self.predictor = CausalPredictor(n_embd) if with_predictor else None
        self.routed_mask = None  # (B, T) bool: which tokens of the last forward went through
        self.causal_choice = None  # (B, T) bool: what causal routing chose (precision, recall)

    def router_matmul_params(self):
        """Matmul weights of the router (and predictor): what routing costs every token."""
        return sum(p.numel() for name, p in self.named_parameters()
                   if not name.startswith("block.") and p.dim() == 2)

    @staticmethod
    def update_weight(scores):
        """w_i = sigmoid(r_i), the update weight that scales a routed token's f (the paper: r_i)."""
        return torch.sigmoid(scores)

    def causal_logits(self, x, scores):
        """The logit that decides token by token: the router's own score, or the predictor's."""
        return scores if self.predictor is None else self.predictor(x)

    def block_update(self, x_sub, cache=None):
        """f(x_sub): the block's update without its residual (attention, then MLP)."""
        attn = self.block.attn_update(x_sub, cache)
        return attn + self.block.mlp_update(x_sub + attn)

    def add_update(self, x, scores, idx, valid=None, cache=None):
        """x_i + w_i * f(x_sub)_i at positions idx (B, m), sorted per row; every other token is
        returned untouched. valid (B, m) marks padding that must stay as it was.

        The rows are picked from x viewed as (B*T, d): index_select copies whole rows, and
        add_rows_'s gradient for x is the incoming gradient itself, where gather/scatter would
        copy and zero full-size tensors in the backward pass."""
        B, T, d = x.shape
        rows = flat_rows(idx, T)  # (B*m,)
        flat = x.reshape(B * T, d)
        x_sub = flat.index_select(0, rows).view(B, -1, d)  # original order: attention stays causal
        w = self.update_weight(scores.gather(1, idx)).unsqueeze(-1)
        weighted = w * self.block_update(x_sub, cache)
        if valid is not None:
            weighted = weighted * valid.unsqueeze(-1)  # padding adds 0: stays bit for bit
        return add_rows_(flat.clone(), rows, weighted.reshape(-1, d).to(x.dtype)).view(B, T, d)

    def add_update_fused(self, x, scores, idx):
        """add_update in top-k mode, ln_1 fused into the gather, the weighting into the scatter."""
        ln_1 = self.block.ln_1
        x_sub, normed = kernels.gather_layernorm(x, idx, ln_1.weight, ln_1.bias, eps=1e-5)
        attn = self.block.attn(normed)
        f = attn + self.block.mlp_update(x_sub + attn)
        return kernels.scatter_weighted_add(x, idx, f, self.update_weight(scores.gather(1, idx)))

    def forward(self, x, mode, cache=None):
        """The new x and the BCE that teaches causal routing (None outside top-k mode)."""
        if mode == "topk":
            return self.forward_topk(x)
        if mode == "causal":
            return (self.forward_causal(x) if cache is None else self.decode(x, cache)), None
        raise ValueError(f"routing_mode must be 'topk' or 'causal', got {mode!r}")

    def forward_topk(self, x):
        """x_i + sigmoid(r_i) f(X_routed)_i for the top-k r_i of each sequence (training); the
        causal logit learns top-k."""
        scores = self.router(x)  # (B, T)
        logits = self.causal_logits(x, scores)
        idx = expert_choice_topk(scores, capacity_to_k(self.capacity, x.size(1)))  # (B, k)
        self.routed_mask = indices_to_mask(idx, x.size(1))
        self.causal_choice = threshold_route(logits.detach())  # what causal mode would have chosen
        bce = topk_bce_loss(logits, self.routed_mask)  # targets per row; trains router or predictor
        if kernels.use_triton(x, self.kernel_impl):
            return self.add_update_fused(x, scores, idx), bce
        return self.add_update(x, scores, idx), bce

    def forward_causal(self, x):
        """x_i + sigmoid(r_i) f(X_routed)_i where sigmoid(causal logit_i) > 0.5, a whole
        sequence. Rows route different counts: they are packed, padding after the real tokens,
        so one batched pass serves them all."""
        scores = self.router(x)
        self.routed_mask = self.causal_choice = threshold_route(self.causal_logits(x, scores))
        if not self.routed_mask.any():
            return x
        idx, valid = pack_mask(self.routed_mask)
        return self.add_update(x, scores, idx, valid)

    def decode(self, x, cache):
        """forward_causal for new tokens against cache (a RowKVCache), each row on its own: its
        cache holds only the tokens it routed; a token that skips the block writes nothing."""
        scores = self.router(x)
        self.routed_mask = self.causal_choice = threshold_route(self.causal_logits(x, scores))
        rows = []
        for b in range(x.size(0)):
            idx = self.routed_mask[b].nonzero().T  # (1, m): the new tokens this row routes
            if idx.numel() == 0:
                rows.append(x[b:b + 1])
            else:
                rows.append(self.add_update(x[b:b + 1], scores[b:b + 1], idx, cache=cache.row(b)))
        return torch.cat(rows)


def routes(layer, settings):
    """Whether block `layer` (0-based) is routed: every route_every-th from route_every-1."""
    return layer % settings.route_every == settings.route_every - 1


class MoDGPT(GPT):
    """GPT-2 whose routed blocks (every route_every-th) process only capacity * T tokens.

    routing_mode: "topk" (training; per-sequence top-k, peeks at the future) or "causal" (each
    token decides alone; what generation uses and what the honest val loss measures)."""

    def __init__(self, config, settings):
        super().__init__(config)
        if not any(routes(i, settings) for i in range(config.n_layer)):
            raise ValueError(f"--route_every {settings.route_every} routes no block of a "
                             f"{config.n_layer}-layer model")
        self.transformer.h = nn.ModuleList(
            RoutedBlock(block, config.n_embd, settings) if routes(i, settings) else block
            for i, block in enumerate(self.transformer.h)
        )
        for block in self.routed_blocks().values():
            block.router.apply(self._init_weights)  # the trunk was initialised by GPT already
            if block.predictor is not None:
                block.predictor.apply(self._init_weights)
        self.settings = settings
        self.routing_mode = "topk"
        if settings.causal_method == "aux_loss":
            self.loss_weights = {"router_bce": settings.aux_loss_coef}
        else:
            self.loss_weights = {"predictor_bce": settings.predictor_coef}

    def routed_blocks(self):
        """{layer index: RoutedBlock}"""
        return {i: b for i, b in enumerate(self.transformer.h) if isinstance(b, RoutedBlock)}

    @contextmanager
    def routing(self, mode):
        """Run the body with routing_mode = mode, then restore the previous mode."""
        if mode not in ("topk", "causal"):
            raise ValueError(f"routing_mode must be 'topk' or 'causal', got {mode!r}")
        previous, self.routing_mode = self.routing_mode, mode
        try:
            yield
        finally:
            self.routing_mode = previous

    # --- forward -------------------------------------------------------------------------

    def new_cache(self):
        """One KVCache per dense block, one RowKVCache per routed one (rows route differently)."""
        return [RowKVCache() if isinstance(b, RoutedBlock) else KVCache()
                for b in self.transformer.h]

    def forward_trunk(self, x, cache=None):
        if cache is not None and self.routing_mode != "causal":
            raise ValueError("a KV cache needs routing_mode 'causal': top-k routing looks at "
                             "future tokens")
        bces = []
        for i, block in enumerate(self.transformer.h):
            layer_cache = None if cache is None else cache[i]
            if isinstance(block, RoutedBlock):
                x, bce = block(x, self.routing_mode, layer_cache)
                if bce is not None:
                    bces.append(bce)
            else:
                x = block(x, layer_cache)
        aux = {name: torch.stack(bces).mean() for name in self.loss_weights} if bces else {}
        return x, aux

    @torch.no_grad()
    def evaluate(self, idx, targets):
        """'loss' is the causal-mode loss (what sampling gets); 'loss_topk' the training mode's.
        Per routed block i: routed_frac_i, the share of tokens causal routing sends through it, and
        causal routing scored against top-k membership on the same hidden states (top-k mode):
        causal_precision_i = |causal & top-k| / |causal| (0 when causal routes nothing) and
        causal_recall_i = |causal & top-k| / |top-k|. Agreement over all tokens would flatter a
        router that never routes (1 - C), so it is not reported."""
        metrics = {}
        with self.routing("topk"):
            metrics["loss_topk"] = self(idx, targets)[1].item()
            for i, block in self.routed_blocks().items():
                both = (block.causal_choice & block.routed_mask).sum().item()
                metrics[f"causal_precision_{i}"] = both / max(1, block.causal_choice.sum().item())
                metrics[f"causal_recall_{i}"] = both / block.routed_mask.sum().item()
        with self.routing("causal"):
            metrics["loss"] = self(idx, targets)[1].item()
            for i, block in self.routed_blocks().items():
                metrics[f"routed_frac_{i}"] = block.routed_mask.float().mean().item()
        return metrics

    @torch.no_grad()
    def generate(self, *args, **kwargs):
        """GPT.generate, always in causal mode: top-k would need tokens not sampled yet."""
        with self.routing("causal"):
            return super().generate(*args, **kwargs)

    @torch.no_grad()
    def depth_per_token(self, idx, prompt_len):
        """(B, T) share of the blocks each token went through when decoding ran it: the forwards
        of cached generate() replayed on idx (generation_forward), so every decision is the one
        sampling made; past the first window a token's decision depends on the window it was
        run in. NaN where a token was never run (the last one, prompt tokens left of the window)."""
        B, T = idx.shape
        depth = torch.full((B, T), float("nan"))
        cache, seen = None, 0
        with self.routing("causal"):
            for n in range(prompt_len, T):  # the forward that chose token n
                _, cache, seen = self.generation_forward(idx[:, :n], cache, seen)
                skipped = sum((~b.routed_mask).float() for b in self.routed_blocks().values())
                ran = 1 - skipped.cpu() / self.config.n_layer  # (B, tokens that forward ran)
                start = n - ran.size(1)
                depth[:, start:n] = torch.where(depth[:, start:n].isnan(), ran, depth[:, start:n])
        return depth

    # --- cost ----------------------------------------------------------------------------

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (DESIGN.md convention). A routed block at capacity c = k/T
        costs c of its matmuls and c^2 of its attention (c*T queries over c*T keys), plus the
        router's (and predictor's) weights for every token."""
        T = seq_len or self.config.block_size
        d = self.config.n_embd
        c = capacity_to_k(self.settings.capacity, T) / T
        flops = 6 * d * self.config.vocab_size  # LM head
        for block in self.transformer.h:
            if isinstance(block, RoutedBlock):
                flops += (c * 6 * block_matmul_params(d) + c * c * attention_flops(d, T)
                          + 6 * block.router_matmul_params())
            else:
                flops += 6 * block_matmul_params(d) + attention_flops(d, T)
        return flops

    def flop_ceiling(self, seq_len=None):
        """The most a MoD step can speed up over a same-dims GPT: GPT FLOPs / MoD FLOPs."""
        return GPT.flops_per_token(self, seq_len) / self.flops_per_token(seq_len)

    # --- what bench.py measures ---------------------------------------------------------

    @classmethod
    def decode_settings(cls, settings):
        """Decoding speed depends on how many tokens the routers send through: four capacities."""
        return {f" C={c}": replace(settings, capacity=c) for c in (0.125, 0.25, 0.5, 1.0)}

    @torch.no_grad()
    def calibrate_untrained(self, seed):
        """Set the bias of what decides causal routing (the router, or the predictor's last
        layer) so that it sends about `capacity` of the tokens through: an untrained one routes
        about half of them whatever C is."""

        def calibrate(block, args):
            logits = block.causal_logits(args[0], block.router(args[0])).flatten()
            c = block.capacity
            cut = torch.quantile(logits, 1 - c) if c < 1 else logits.min() - 1
            deciding = block.router if block.predictor is None else block.predictor[-1]
            deciding.bias -= cut  # the router's bias never changes top-k; it moves the causal cut

        blocks = self.routed_blocks().values()
        hooks = [block.register_forward_pre_hook(calibrate) for block in blocks]
        tokens = torch.randint(self.config.vocab_size, (4, self.config.block_size),
                               generator=torch.Generator().manual_seed(seed))
        with self.routing("causal"):  # block by block: each sees the routing before it
            self(tokens.to(self.lm_head.weight.device))
        for hook in hooks:
            hook.remove()
        return self

    def kernel_block(self):
        """The first routed block, run in top-k (training) mode: what --kernels switches."""
        block = next(iter(self.routed_blocks().values()))
        return block, lambda x: block(x, "topk")[0]

    # --- from a trained dense model --------------------------------------------------------

    @classmethod
    def from_dense(cls, dense, settings):
        """The dense model's weights in every block (routed ones wrap them); fresh routers."""
        model = cls(replace(dense.config), settings)
        blocks = [b.block if isinstance(b, RoutedBlock) else b for b in model.transformer.h]
        copy_weights(zip(model.embeddings_and_head() + blocks,
                         dense.embeddings_and_head() + list(dense.transformer.h)))
        return model
