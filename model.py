"""
GPT-2 in one file (nanoGPT layout, Hugging Face parameter names).

    tokens -> wte + wpe -> [ trunk: n_layer Blocks ] -> ln_f -> lm_head -> logits

Each technique of this repository is a subclass of GPT (a "variant"), registered in
variants.py. The class GPT below holds, as GPT-2's own behaviour, the default of every member
of the variant contract (variants.CONTRACT lists them, one line each); the trainer, the sampler
and the benchmark talk to every model only through these.

forward returns (logits, loss, aux). Block exposes its attention and MLP updates separately
(`attn_update`, `mlp_update`) so that a variant reuses them instead of copying attention.
Mixture-of-Modules projects query, key and value itself (its tokens take them from different
modules) and calls the same `causal_attention`. Generation is one loop, `GPT.generate`; a
variant changes what one step runs through `generation_forward`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # context length
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for speed
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as in GPT-2


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's has no bias=False before 2.1)."""

    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class KVCache:
    """Keys and values of the tokens one attention layer has seen, (B, n_head, T, head_size)."""

    def __init__(self):
        self.k = None
        self.v = None

    def append(self, k, v):
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def __len__(self):
        return 0 if self.k is None else self.k.size(2)

    def nbytes(self):
        return 0 if self.k is None else self.k.nbytes + self.v.nbytes


class RowKVCache:
    """One KVCache per batch row, for a layer whose rows keep different numbers of tokens."""

    def __init__(self):
        self.rows = {}  # row -> KVCache, made when the row first writes

    def row(self, r):
        return self.rows.setdefault(r, KVCache())

    def nbytes(self):
        return sum(cache.nbytes() for cache in self.rows.values())


def split_heads(t, n_head):
    """(N, T, C) -> (N, n_head, T, C // n_head)."""
    N, T, C = t.shape
    return t.view(N, T, n_head, C // n_head).transpose(1, 2)


def merge_heads(t):
    """(N, n_head, T, head_size) -> (N, T, C)."""
    N, n_head, T, hs = t.shape
    return t.transpose(1, 2).contiguous().view(N, T, n_head * hs)


def causal_attention(qkv, n_head, cache=None, dropout_p=0.0):
    """softmax(q k^T / sqrt(head_size), causal) v for qkv (N, T, 3C) -> (N, T, C). With a
    cache, the T tokens are the newest: they attend to every cached key and causally to
    each other, and their keys and values are appended."""
    T = qkv.size(1)
    q, k, v = (split_heads(t, n_head) for t in qkv.chunk(3, dim=2))
    past = 0 if cache is None else len(cache)
    if cache is not None:
        k, v = cache.append(k, v)
    mask = None  # nothing cached yet: is_causal; one new token may see every key: no mask at all
    if past and T > 1:  # several new tokens after a cached prefix: causal within the new ones
        mask = torch.ones(T, past + T, dtype=torch.bool, device=qkv.device).tril(diagonal=past)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=past == 0,
                                       dropout_p=dropout_p)
    return merge_heads(y)


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x, cache=None):
        """x: (B, T, C). With a cache, x holds the newest T tokens and attends to all cached."""
        dropout_p = self.dropout if self.training else 0.0
        y = causal_attention(self.c_attn(x), self.n_head, cache, dropout_p)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        x = F.gelu(self.c_fc(x), approximate="tanh")  # GPT-2 uses the tanh approximation
        return self.dropout(self.c_proj(x))


class Block(nn.Module):
    """x -> x + attn(ln_1(x)) -> x + mlp(ln_2(x)). The two updates are exposed separately
    (without the residual) so that subclasses can reuse each one on its own."""

    def __init__(self, config):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def attn_update(self, x, cache=None):
        return self.attn(self.ln_1(x), cache)

    def mlp_update(self, x):
        return self.mlp(self.ln_2(x))

    def forward(self, x, cache=None):
        x = x + self.attn_update(x, cache)
        return x + self.mlp_update(x)


# FLOPs convention (DESIGN.md, PaLM/nanoGPT style): training FLOPs per token =
# 6 * matmul weights the token passes through + 12 * d * T_attn per layer it attends in.
def block_matmul_params(n_embd):
    return 12 * n_embd * n_embd  # c_attn 3d^2 + attn c_proj d^2 + c_fc 4d^2 + mlp c_proj 4d^2


def attention_flops(n_embd, n_keys):
    return 12 * n_embd * n_keys


def sample_next(logits, temperature=1.0, top_k=None):
    """One token id per row from the last position's logits (B, 1, V): greedy at temperature 0,
    else a draw from softmax(logits / temperature) over the top_k most likely."""
    logits = logits[:, -1, :] / max(temperature, 1e-8)
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


def copy_weights(pairs):
    """Every from_dense's one idiom: load each (target, source) module pair's weights, which
    have the same layout (a block into another model's block of the same dims)."""
    with torch.no_grad():
        for target, source in pairs:
            target.load_state_dict(source.state_dict())


class GPT(nn.Module):
    starts_from_dense = False  # plain GPT-2 trains from scratch
    ddp_find_unused_parameters = False  # every weight gets a gradient in every step
    loss_weights = {}  # name of an aux loss -> coefficient; plain GPT-2 has none

    def __init__(self, config, settings=None):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=self.make_blocks(config),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by depth
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def make_blocks(self, config):
        """transformer.h: n_layer Blocks (a variant whose trunk is no stack of blocks: none)."""
        return nn.ModuleList([Block(config) for _ in range(config.n_layer)])

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @classmethod
    def from_dense(cls, dense, settings=None):
        """The variant built from a trained GPT-2; for GPT-2 itself, the model as it is."""
        return dense

    @classmethod
    def train_defaults(cls, cfg):
        """{training flag: value} this variant changes from train.py's defaults, given the run's
        TrainConfig (e.g. its batch size); a flag the user gives still wins. GPT-2: none."""
        return {}

    def embeddings_and_head(self):
        """The modules every variant shares with GPT-2 around its trunk (for from_dense)."""
        return [self.transformer.wte, self.transformer.wpe, self.transformer.ln_f, self.lm_head]

    def checkpoint_state_dict(self):
        """The tensors a checkpoint keeps: all of them here."""
        return self.state_dict()

    def get_num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    # --- forward -------------------------------------------------------------------------

    def new_cache(self):
        """A fresh KV cache for generation: one KVCache per layer."""
        return [KVCache() for _ in self.transformer.h]

    def forward_trunk(self, x, cache=None):
        """The part a subclass may replace. Returns the hidden state and a dict of aux losses."""
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if cache is None else cache[i])
        return x, {}

    def forward(self, idx, targets=None, cache=None, pos_offset=0):
        """idx: (B, T) token ids. With targets, returns logits for every position and the
        mean cross-entropy; without, only the last position's logits (what sampling needs).
        With a cache, idx holds only the new tokens and pos_offset the number already seen."""
        device = idx.device
        b, t = idx.size()
        if pos_offset + t > self.config.block_size:
            raise ValueError(f"sequence of length {pos_offset + t} exceeds block_size "
                             f"{self.config.block_size}")
        pos = torch.arange(pos_offset, pos_offset + t, dtype=torch.long, device=device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        x, aux = self.forward_trunk(x, cache)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss, aux

    def training_loss(self, lm_loss, aux):
        """What a training step minimises: lm_loss + sum of loss_weights[name] * aux[name]."""
        unweighted = aux.keys() - self.loss_weights.keys()
        if unweighted:
            name = sorted(unweighted)[0]
            raise ValueError(f"{type(self).__name__}.forward_trunk returns the aux loss {name!r}, "
                             f"which its loss_weights has no coefficient for: add it there")
        return lm_loss + sum(self.loss_weights[k] * v for k, v in aux.items())

    @torch.no_grad()
    def evaluate(self, idx, targets):
        """Metrics for one validation batch; 'loss' is the number train.py tracks as val loss.
        Subclasses may add metrics of their own."""
        _, loss, _ = self(idx, targets)
        return {"loss": loss.item()}

    # --- cost ----------------------------------------------------------------------------

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (DESIGN.md convention): blocks + LM head; embeddings free."""
        T = seq_len or self.config.block_size
        d, L = self.config.n_embd, self.config.n_layer
        per_block = 6 * block_matmul_params(d) + attention_flops(d, T)
        return L * per_block + 6 * d * self.config.vocab_size

    def step_flops_per_token(self, seq_len=None):
        """Training FLOPs per token of the computation the last forward did (bench.py's rows);
        GPT-2 does the same every forward, a variant whose cost varies counts what it ran."""
        return self.flops_per_token(seq_len)

    def estimate_mfu(self, tokens_per_iter, dt, peak_flops=312e12):
        """Model FLOPs utilisation, as a fraction of peak_flops (default: A100 bf16)."""
        return self.flops_per_token() * tokens_per_iter / dt / peak_flops

    # --- training utilities ----------------------------------------------------------------

    def crop_block_size(self, block_size):
        """Shrink the context (e.g. to finetune GPT-2 at 256 tokens)."""
        assert block_size <= self.config.block_size
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW over the parameters that train; matrices decay, biases and norms do not."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        fused = device_type in ("cuda", "cpu")  # one kernel per step, not ~10 ops per parameter
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    # --- generation ----------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True,
                 cache=None):
        """Sample max_new_tokens after idx (B, T), one generation_forward per token. Pass an
        empty `cache` (from new_cache) to inspect it afterwards; once the text outgrows
        block_size, generation restarts on a fresh cache that holds the last window."""
        seen = 0  # tokens the cache holds
        for _ in range(max_new_tokens):
            logits, cache, seen = self.generation_forward(idx, cache, seen, use_cache)
            idx = torch.cat((idx, sample_next(logits, temperature, top_k)), dim=1)
        return idx

    def generation_forward(self, idx, cache, seen, use_cache=True):
        """The forward that predicts the token after idx: (last logits, cache, tokens it holds).
        With the cache, the prompt (or, once the window slides past block_size, the last
        window) runs once on a fresh cache and each new token costs one position; without it,
        the last block_size tokens are recomputed. A variant with per-prompt state (decisions
        made on the prompt) overrides this: it is the one place generation's window lives."""
        window = idx[:, -self.config.block_size:]
        if not use_cache:
            return self(window)[0], None, 0
        if 0 < seen < self.config.block_size:
            return self(idx[:, -1:], cache=cache, pos_offset=seen)[0], cache, seen + 1
        if cache is None or seen > 0:  # the first step without a cache, or the window slid
            cache = self.new_cache()
        return self(window, cache=cache)[0], cache, window.size(1)

    # --- what bench.py measures ---------------------------------------------------------

    @classmethod
    def decode_settings(cls, settings):
        """{row label suffix: settings} that bench.py --decode times, one row each."""
        return {"": settings}

    def calibrate_untrained(self, seed):
        """Make an untrained model behave as its settings say before bench.py times it; GPT-2:
        nothing to do."""
        return self

    def kernel_block(self):
        """(module, run(x) -> output) whose kernels the settings' `kernels` flag switches, for
        bench.py --compare_kernels; None: no such kernels."""
        return None

    # --- what generation used (sample.py --show_depth) -----------------------------------

    def kv_cache_nbytes(self, cache):
        """Bytes of keys and values a cache holds (a subclass's cache may count its own)."""
        if hasattr(cache, "nbytes"):
            return cache.nbytes()
        return sum(layer.nbytes() for layer in cache)

    @torch.no_grad()
    def depth_per_token(self, idx, prompt_len):
        """(B, T) share of the network's sublayers each token went through: all of them here."""
        return torch.ones(idx.shape, dtype=torch.float32)

    def context_windows(self, idx):
        """idx (B, T) cut into consecutive block_size windows: how a depth view reads text
        longer than the context, one forward per window."""
        size = self.config.block_size
        return [idx[:, start:start + size] for start in range(0, idx.size(1), size)]

    # --- pretrained GPT-2 ----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0, cache_dir=None, base_url=None):
        """GPT-2 weights in Hugging Face layout: a hub name (gpt2, gpt2-medium, gpt2-large,
        gpt2-xl, or any repo with config.json + model.safetensors), a local directory, or a
        .safetensors file. The reading and downloading live in gpt2_weights.py."""
        from gpt2_weights import read_gpt2

        config, state_dict = read_gpt2(name_or_path, cache_dir, base_url)
        model = cls(GPTConfig(**{**config, "dropout": dropout}))
        sd = model.state_dict()
        # the head is tied to wte
        missing = [k for k in sd if k not in state_dict and k != "lm_head.weight"]
        unexpected = [k for k in state_dict if k not in sd]
        if missing or unexpected:
            raise ValueError(f"{name_or_path}: not a GPT-2 checkpoint ({len(missing)} tensors "
                             f"missing, {len(unexpected)} unexpected, "
                             f"e.g. {(missing + unexpected)[0]})")
        with torch.no_grad():
            for k, v in state_dict.items():
                if v.shape != sd[k].shape:
                    raise ValueError(f"{name_or_path}: {k} has shape {tuple(v.shape)}, "
                                     f"the model wants {tuple(sd[k].shape)}")
                sd[k].copy_(v)
        return model
