"""
GPT-2 weights in Hugging Face layout, read with no extra package.

A hub name (gpt2, gpt2-medium, ...) is downloaded once into ~/.cache/nanodepth; a local
folder holding config.json + model.safetensors, or a .safetensors file, is read in place.
The hub's files store keys without the `transformer.` prefix and no separate head (tied to
wte); a model saved by the transformers library carries the prefix and may carry
`lm_head.weight`: both are accepted. Hugging Face's Conv1D stores (in, out) matrices, so the
four projection weights are transposed for nn.Linear.
"""

import json
import math
import os
import struct
import sys
from pathlib import Path

import torch

TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def read_gpt2(name_or_path, cache_dir=None, base_url=None):
    """-> (GPTConfig fields as a dict, state dict in nanodepth's names). Raises ValueError,
    FileNotFoundError or RuntimeError (download) with a message that names the file."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        weights_file, config_file = path, path.parent / "config.json"
    elif path.is_dir():
        weights_file, config_file = path / "model.safetensors", path / "config.json"
    elif looks_like_path(name_or_path):
        raise FileNotFoundError(f"no file at {name_or_path} (pass an existing .safetensors file or "
                                f"a folder holding config.json and model.safetensors)")
    else:
        weights_file = download_from_hub(name_or_path, "model.safetensors", cache_dir, base_url)
        config_file = download_from_hub(name_or_path, "config.json", cache_dir, base_url)
    if not weights_file.exists():
        raise FileNotFoundError(
            f"no weights at {weights_file} (a GPT-2 folder holds config.json and model.safetensors)"
        )
    hf = {k.removeprefix("transformer."): v for k, v in load_safetensors(weights_file).items()}
    try:
        hf_config = json.loads(config_file.read_text()) if config_file.exists() else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_file}: not a JSON file ({e})") from None
    if "wte.weight" not in hf or "wpe.weight" not in hf or not any(k.startswith("h.") for k in hf):
        raise ValueError(f"{weights_file} is not a GPT-2 checkpoint (no wte/wpe/h.* weights)")
    vocab_size, n_embd = hf["wte.weight"].shape
    config = dict(block_size=hf["wpe.weight"].shape[0], vocab_size=vocab_size, n_embd=n_embd,
                  bias=True,
                  n_layer=1 + max(int(k.split(".")[1]) for k in hf if k.startswith("h.")),
                  n_head=hf_config.get("n_head", n_embd // 64))
    state_dict = {}
    for k, v in hf.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # old checkpoints store the causal mask as a buffer
        if k.endswith(TRANSPOSED):
            v = v.t()
        state_dict[k if k == "lm_head.weight" else "transformer." + k] = v.float()
    return config, state_dict


def looks_like_path(name):
    """A hub name is `name` or `owner/name`; anything else is meant as a local path: absolute,
    starting with . or ~, ending in .safetensors, or with more than one separator."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.endswith(".safetensors")
            or name.count("/") > 1 or (os.sep != "/" and os.sep in name))


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
        raise ValueError(
            f"{path}: not a safetensors file (header length {header_len} > file size)"
        )
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
            raise ValueError(
                f"{path}: tensor {name!r} has data_offsets outside the file or of the wrong size"
            )
        raw = bytearray(body[begin:end])  # a copy: the tensor owns its memory
        tensors[name] = (torch.frombuffer(raw, dtype=dtype).reshape(shape) if raw
                         else torch.empty(shape, dtype=dtype))
    return tensors


HF_URL = "https://huggingface.co"


def download_from_hub(repo, filename, cache_dir=None, base_url=None):
    """Fetch {base_url}/{repo}/resolve/main/{filename} into the cache once; return its path.
    A failed download removes the folders it created, so the cache holds no empty entries."""
    base_url = base_url or os.environ.get("NANODEPTH_HF_URL", HF_URL)
    cache_dir = Path(
        cache_dir or os.environ.get("NANODEPTH_CACHE", Path.home() / ".cache" / "nanodepth")
    )
    target = cache_dir / repo / filename
    if target.exists():
        return target
    new_folders = [d for d in [target.parent, *target.parent.parents] if not d.exists()]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    try:
        fetch(f"{base_url}/{repo}/resolve/main/{filename}", tmp, repo)
    except BaseException:  # also Ctrl-C: leave the cache as it was
        tmp.unlink(missing_ok=True)
        for folder in new_folders:  # deepest first
            if not any(folder.iterdir()):
                folder.rmdir()
        raise
    os.replace(tmp, target)  # atomic: a killed download leaves no half file behind
    return target


def fetch(url, tmp, repo):
    """Stream url into the file tmp, with a progress line for big files; RuntimeError if the
    hub does not have it or cannot be reached."""
    import requests

    filename = url.rsplit("/", 1)[-1]
    try:
        with requests.get(url, stream=True, timeout=30) as r:
            if r.status_code == 404:
                raise RuntimeError(
                    f"{url} not found (404): is {repo!r} a GPT-2 repository on the hub?"
                )
            r.raise_for_status()
            total, done = int(r.headers.get("content-length", 0)), 0
            with open(tmp, "wb") as f:
                for chunk in r.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    if total > (1 << 24):
                        print(f"\r{filename}: {done / 2**20:.0f}/{total / 2**20:.0f} MiB",
                              end="", file=sys.stderr)
            if total > (1 << 24):
                print(file=sys.stderr)
    except requests.RequestException as e:
        raise RuntimeError(
            f"could not download {url} ({e.__class__.__name__}). Check your connection, or pass a "
            f"local directory holding config.json and model.safetensors instead of {repo!r}."
        ) from None
