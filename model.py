"""
GPT-2 in one file (nanoGPT layout, Hugging Face parameter names).

    tokens -> wte + wpe -> [ trunk: n_layer Blocks ] -> ln_f -> lm_head -> logits

Other files subclass GPT and override `forward_trunk` (and `flops_per_token`); they reuse
`Block.attn_update` / `Block.mlp_update` instead of copying attention.

A model's forward returns (logits, loss, aux): `aux` maps a name to an unweighted
auxiliary loss (empty for plain GPT-2); `model.loss_weights` maps the same names to the
coefficient train.py multiplies it by.
"""

import json
import math
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

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
        """x: (B, T, C). With a cache, x holds the newest T tokens and attends to all cached ones."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        past = 0
        if cache is not None:
            past = len(cache)
            k, v = cache.append(k, v)
        if past == 0:
            mask, is_causal = None, True
        elif T == 1:
            mask, is_causal = None, False  # one new token may see everything before it
        else:  # several new tokens after a cached prefix: causal within the new ones
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            is_causal = False
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
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

    def update(self, x, cache=None):
        """f(x) = the whole block's output minus its input."""
        h = x + self.attn_update(x, cache)
        return h + self.mlp_update(h) - x

    def forward(self, x, cache=None):
        x = x + self.attn_update(x, cache)
        return x + self.mlp_update(x)


# FLOPs convention (DESIGN.md, PaLM/nanoGPT style): training FLOPs per token =
# 6 * matmul weights the token passes through + 12 * d * T_attn per layer it attends in.
def block_matmul_params(n_embd):
    return 12 * n_embd * n_embd  # c_attn 3d^2 + attn c_proj d^2 + c_fc 4d^2 + mlp c_proj 4d^2


def attention_flops(n_embd, n_keys):
    return 12 * n_embd * n_keys


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.vocab_size is not None and config.block_size is not None
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as GPT-2
        self.loss_weights = {}  # name of an aux loss -> coefficient; plain GPT-2 has none
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by depth
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

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
            raise ValueError(f"sequence of length {pos_offset + t} exceeds block_size {self.config.block_size}")
        pos = torch.arange(pos_offset, pos_offset + t, dtype=torch.long, device=device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        x, aux = self.forward_trunk(x, cache)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss, aux

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
        fused = device_type == "cuda"
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    # --- generation ----------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, cache=None):
        """Sample max_new_tokens after idx (B, T). With the cache, the prompt is run once and
        each new token costs one position; without it, the whole window is recomputed.
        Pass an empty `cache` (from new_cache) to inspect it afterwards; if the text outgrows
        block_size, generation restarts on a fresh cache that holds the last window."""
        seen = 0  # tokens the cache holds
        for _ in range(max_new_tokens):
            if use_cache and seen >= self.config.block_size:
                cache, seen = None, 0  # the window slid past the context: start a fresh cache
            if use_cache and seen > 0:
                logits, _, _ = self(idx[:, -1:], cache=cache, pos_offset=seen)
                seen += 1
            else:  # no cache, or the prompt: run the last block_size tokens in full
                if use_cache and cache is None:
                    cache = self.new_cache()
                idx_cond = idx[:, -self.config.block_size:]
                logits, _, _ = self(idx_cond, cache=cache if use_cache else None)
                seen = idx_cond.size(1) if use_cache else 0
            logits = logits[:, -1, :] / max(temperature, 1e-8)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            if temperature == 0:
                idx_next = logits.argmax(dim=-1, keepdim=True)
            else:
                idx_next = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx

    # --- what generation used (sample.py --show_depth) -----------------------------------

    def kv_cache_nbytes(self, cache):
        """Bytes of keys and values a cache holds (a subclass's cache may count its own)."""
        return cache.nbytes() if hasattr(cache, "nbytes") else sum(layer.nbytes() for layer in cache)

    @torch.no_grad()
    def depth_per_token(self, idx, prompt_len):
        """(B, T) fraction of the network's sublayers each token went through: all of them here."""
        return torch.ones(idx.shape, dtype=torch.float32)

    # --- pretrained GPT-2 ----------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path, dropout=0.0, cache_dir=None, base_url=None):
        """GPT-2 weights in Hugging Face layout: a hub name (gpt2, gpt2-medium, gpt2-large,
        gpt2-xl, or any repo with config.json + model.safetensors), a local directory, or a
        .safetensors file."""
        path = Path(name_or_path)
        if path.is_file():
            weights_file, config_file = path, path.parent / "config.json"
        elif path.is_dir():
            weights_file, config_file = path / "model.safetensors", path / "config.json"
        else:
            weights_file = download_from_hub(name_or_path, "model.safetensors", cache_dir, base_url)
            config_file = download_from_hub(name_or_path, "config.json", cache_dir, base_url)
        if not weights_file.exists():
            raise FileNotFoundError(f"no weights at {weights_file}")
        hf = load_safetensors(weights_file)
        hf = {k.removeprefix("transformer."): v for k, v in hf.items()}
        hf_config = json.loads(config_file.read_text()) if config_file.exists() else {}
        if "wte.weight" not in hf or "wpe.weight" not in hf:
            raise ValueError(f"{weights_file} is not a GPT-2 checkpoint (no wte/wpe weights)")
        vocab_size, n_embd = hf["wte.weight"].shape
        n_layer = 1 + max(int(k.split(".")[1]) for k in hf if k.startswith("h."))
        config = GPTConfig(
            block_size=hf["wpe.weight"].shape[0], vocab_size=vocab_size, n_layer=n_layer,
            n_head=hf_config.get("n_head", n_embd // 64), n_embd=n_embd, dropout=dropout,
            bias=True,
        )
        model = cls(config)
        sd = model.state_dict()
        transposed = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        for k, v in hf.items():
            if k.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # old checkpoints store the causal mask as a buffer
            ours = k if k == "lm_head.weight" else "transformer." + k
            if ours not in sd:
                raise ValueError(f"unexpected tensor {k!r} in {weights_file}")
            if k.endswith(transposed):
                v = v.t()  # Hugging Face's Conv1D stores (in, out); nn.Linear wants (out, in)
            if v.shape != sd[ours].shape:
                raise ValueError(f"{k}: shape {tuple(v.shape)} does not fit {tuple(sd[ours].shape)}")
            with torch.no_grad():
                sd[ours].copy_(v)
        missing = [k for k in sd if k != "lm_head.weight" and k.removeprefix("transformer.") not in hf]
        if missing:
            raise ValueError(f"{weights_file} lacks {len(missing)} tensors, e.g. {missing[0]}")
        return model


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def load_safetensors(path):
    """Read a .safetensors file with no extra package: an 8-byte little-endian header length,
    a JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes."""
    data = Path(path).read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise ValueError(f"{path}: not a safetensors file (header length {header_len} > file size)")
    try:
        header = json.loads(data[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a safetensors file (bad JSON header: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (the header is not a JSON object)")
    body = memoryview(data)[8 + header_len:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[info["dtype"]]
            shape = [int(s) for s in info["shape"]]
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: malformed entry for tensor {name!r}") from None
        if any(s < 0 for s in shape):
            raise ValueError(f"{path}: malformed entry for tensor {name!r} (negative dimension)")
        expected = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if not 0 <= begin <= end <= len(body) or end - begin != expected:
            raise ValueError(f"{path}: tensor {name!r} has data_offsets outside the file or of the wrong size")
        raw = bytearray(body[begin:end])  # a copy: the tensor owns its memory
        tensors[name] = torch.frombuffer(raw, dtype=dtype).reshape(shape) if raw else torch.empty(shape, dtype=dtype)
    return tensors


HF_URL = "https://huggingface.co"


def download_from_hub(repo, filename, cache_dir=None, base_url=None):
    """Fetch {base_url}/{repo}/resolve/main/{filename} into the cache once; return its path."""
    import requests

    base_url = base_url or os.environ.get("NANODEPTH_HF_URL", HF_URL)
    cache_dir = Path(cache_dir or os.environ.get("NANODEPTH_CACHE", Path.home() / ".cache" / "nanodepth"))
    target = cache_dir / repo / filename
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    url = f"{base_url}/{repo}/resolve/main/{filename}"
    try:
        with requests.get(url, stream=True, timeout=30) as r:
            if r.status_code == 404:
                raise RuntimeError(f"{url} not found (404): is {repo!r} a GPT-2 repository on the hub?")
            r.raise_for_status()
            total = int(r.headers.get("content-length", 0))
            tmp, done = target.with_suffix(target.suffix + ".part"), 0
            with open(tmp, "wb") as f:
                for chunk in r.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    if total > (1 << 24):
                        print(f"\r{filename}: {done / 2**20:.0f}/{total / 2**20:.0f} MiB", end="", file=sys.stderr)
            if total > (1 << 24):
                print(file=sys.stderr)
            os.replace(tmp, target)  # atomic: a killed download leaves no half file behind
    except requests.RequestException as e:
        raise RuntimeError(
            f"could not download {url} ({e.__class__.__name__}). Check your connection, or pass a "
            f"local directory holding config.json and model.safetensors instead of {repo!r}."
        ) from None
    return target
