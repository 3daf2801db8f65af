"""
Loading GPT-2 weights in Hugging Face layout (gpt2_weights.py): from a directory, through a
local stand-in for the hub, and refusing malformed safetensors. The reference is a tiny GPT-2
written by hand from the raw tensors. Everything is offline, tiny and seeded.
"""

import http.server
import json
import math
import os
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import checkpoint
from gpt2_weights import load_safetensors
from model import GPT
from test_model import all_logits, sample_tokens

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent

# --- a tiny GPT-2 in Hugging Face layout, written by hand -------------------------------------

HF_CONFIG = dict(n_layer=2, n_head=4, n_embd=32, n_positions=12, vocab_size=37)

SAFETENSORS_NAMES = {torch.float32: "F32"}  # all this file writes


def safetensors_bytes(tensors):
    """The safetensors format: 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets}} padded with spaces to 8 bytes, then the raw bytes."""
    header, chunks, offset = {}, [], 0
    for name, t in tensors.items():
        raw = t.contiguous().numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header["__metadata__"] = {"format": "pt"}
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    return struct.pack("<Q", len(header_bytes)) + header_bytes + b"".join(chunks)


def tiny_hf_gpt2(seed=0):
    """Random GPT-2 tensors named and shaped as Hugging Face stores them: Conv1D weights are
    (in, out), the transpose of nn.Linear's (out, in)."""
    g = torch.Generator().manual_seed(seed)
    L, C, P, V = (HF_CONFIG[k] for k in ("n_layer", "n_embd", "n_positions", "vocab_size"))

    def rand(*shape, mean=0.0, std=0.2):
        return mean + std * torch.randn(*shape, generator=g)

    hf = {"wte.weight": rand(V, C), "wpe.weight": rand(P, C)}
    for i in range(L):
        hf.update({
            f"h.{i}.ln_1.weight": rand(C, mean=1.0), f"h.{i}.ln_1.bias": rand(C),
            f"h.{i}.attn.c_attn.weight": rand(C, 3 * C), f"h.{i}.attn.c_attn.bias": rand(3 * C),
            f"h.{i}.attn.c_proj.weight": rand(C, C), f"h.{i}.attn.c_proj.bias": rand(C),
            f"h.{i}.ln_2.weight": rand(C, mean=1.0), f"h.{i}.ln_2.bias": rand(C),
            f"h.{i}.mlp.c_fc.weight": rand(C, 4 * C), f"h.{i}.mlp.c_fc.bias": rand(4 * C),
            f"h.{i}.mlp.c_proj.weight": rand(4 * C, C), f"h.{i}.mlp.c_proj.bias": rand(C),
        })
    hf.update({"ln_f.weight": rand(C, mean=1.0), "ln_f.bias": rand(C)})
    return hf


def hub_style(hf):
    """The hub's gpt2 file: no `transformer.` prefix, no lm_head (tied), and the old causal-mask
    buffer `h.N.attn.bias` that the loader must skip."""
    P = HF_CONFIG["n_positions"]
    mask = torch.ones(P, P).tril().view(1, 1, P, P)
    return {**hf, **{f"h.{i}.attn.bias": mask for i in range(HF_CONFIG["n_layer"])}}


def transformers_style(hf):
    """A file saved by the transformers library: `transformer.` prefix plus lm_head.weight."""
    return {**{"transformer." + k: v for k, v in hf.items()}, "lm_head.weight": hf["wte.weight"].clone()}


def write_checkpoint(directory, tensors):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.safetensors").write_bytes(safetensors_bytes(tensors))
    (directory / "config.json").write_text(json.dumps(HF_CONFIG))
    return directory


def reference_gpt2_logits(hf, idx):
    """GPT-2's forward written from the raw Hugging Face tensors, in float64: Conv1D is
    x @ W + b, LayerNorm eps 1e-5, tanh GELU, causal softmax attention, head tied to wte."""
    hf = {k: v.double() for k, v in hf.items()}
    n_head, C = HF_CONFIG["n_head"], HF_CONFIG["n_embd"]
    B, T = idx.shape
    hs = C // n_head

    def layer_norm(x, w, b):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + 1e-5) * w + b

    def gelu_tanh(x):
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    x = hf["wte.weight"][idx] + hf["wpe.weight"][:T]
    future = torch.ones(T, T, dtype=torch.bool).triu(diagonal=1)
    for i in range(HF_CONFIG["n_layer"]):
        p = f"h.{i}."
        h = layer_norm(x, hf[p + "ln_1.weight"], hf[p + "ln_1.bias"])
        qkv = h @ hf[p + "attn.c_attn.weight"] + hf[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(B, T, n_head, hs).transpose(1, 2) for t in qkv.split(C, dim=-1))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(hs)
        attn = scores.masked_fill(future, float("-inf")).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(B, T, C)
        x = x + y @ hf[p + "attn.c_proj.weight"] + hf[p + "attn.c_proj.bias"]
        h = layer_norm(x, hf[p + "ln_2.weight"], hf[p + "ln_2.bias"])
        m = gelu_tanh(h @ hf[p + "mlp.c_fc.weight"] + hf[p + "mlp.c_fc.bias"])
        x = x + m @ hf[p + "mlp.c_proj.weight"] + hf[p + "mlp.c_proj.bias"]
    x = layer_norm(x, hf["ln_f.weight"], hf["ln_f.bias"])
    return x @ hf["wte.weight"].T


# --- loading Hugging Face-layout GPT-2 weights -------------------------------------------------

@pytest.mark.parametrize("layout", [hub_style, transformers_style], ids=["hub", "transformers"])
def test_loaded_gpt2_matches_a_reference_forward_from_the_raw_tensors(tmp_path, layout):
    hf = tiny_hf_gpt2()
    write_checkpoint(tmp_path / "ckpt", layout(hf))
    model = GPT.from_pretrained(str(tmp_path / "ckpt")).eval()
    cfg = model.config
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == tuple(
        HF_CONFIG[k] for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size"))
    idx = sample_tokens(5, 2, HF_CONFIG["n_positions"], HF_CONFIG["vocab_size"])
    ours = all_logits(model, idx).double()
    torch.testing.assert_close(ours, reference_gpt2_logits(hf, idx), rtol=1e-5, atol=1e-5)


def test_a_safetensors_file_path_loads_with_the_config_beside_it(tmp_path):
    hf = tiny_hf_gpt2(seed=1)
    write_checkpoint(tmp_path, transformers_style(hf))
    model = GPT.from_pretrained(str(tmp_path / "model.safetensors")).eval()
    idx = sample_tokens(6, 1, 7, HF_CONFIG["vocab_size"])
    torch.testing.assert_close(all_logits(model, idx).double(), reference_gpt2_logits(hf, idx),
                               rtol=1e-5, atol=1e-5)


def test_a_safetensors_file_without_wte_is_not_taken_for_gpt2(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(safetensors_bytes({"encoder.weight": torch.zeros(4, 4)}))
    with pytest.raises(ValueError, match="not a GPT-2 checkpoint"):
        GPT.from_pretrained(str(path))


def test_a_gpt2_file_missing_a_tensor_or_holding_a_stranger_is_refused(tmp_path):
    hf = tiny_hf_gpt2()
    missing = {k: v for k, v in hf.items() if k != "h.1.mlp.c_fc.bias"}
    write_checkpoint(tmp_path / "missing", missing)
    with pytest.raises(ValueError, match="1 tensors missing"):
        GPT.from_pretrained(str(tmp_path / "missing"))
    write_checkpoint(tmp_path / "extra", {**hf, "h.0.attn.rotary": torch.zeros(3)})
    with pytest.raises(ValueError, match="1 unexpected"):
        GPT.from_pretrained(str(tmp_path / "extra"))


# --- downloading through a local stand-in for the hub -----------------------------------------

@pytest.fixture
def hub(monkeypatch):
    """An HTTP server on 127.0.0.1 serving /<repo>/resolve/main/<file> from a dict; it records
    every path it is asked for."""
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    files, seen = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.path)
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass  # keep pytest's output clean

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}", files=files, seen=seen)
    server.shutdown()
    server.server_close()
    thread.join()


def test_from_pretrained_downloads_from_the_hub_once_then_uses_the_cache(tmp_path, hub):
    hf = tiny_hf_gpt2(seed=2)
    weights = safetensors_bytes(hub_style(hf))
    hub.files["/tiny/gpt2/resolve/main/model.safetensors"] = weights
    hub.files["/tiny/gpt2/resolve/main/config.json"] = json.dumps(HF_CONFIG).encode()

    model = GPT.from_pretrained("tiny/gpt2", cache_dir=tmp_path, base_url=hub.url)
    assert sorted(hub.seen) == ["/tiny/gpt2/resolve/main/config.json",
                                "/tiny/gpt2/resolve/main/model.safetensors"]
    assert (tmp_path / "tiny" / "gpt2" / "model.safetensors").read_bytes() == weights
    assert torch.equal(model.transformer.wte.weight, hf["wte.weight"])
    assert torch.equal(model.transformer.h[1].attn.c_attn.weight, hf["h.1.attn.c_attn.weight"].t())
    assert torch.equal(model.transformer.h[0].mlp.c_proj.bias, hf["h.0.mlp.c_proj.bias"])

    requests_before = len(hub.seen)
    again = GPT.from_pretrained("tiny/gpt2", cache_dir=tmp_path, base_url=hub.url)
    assert len(hub.seen) == requests_before  # served from the cache
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)


def test_an_unknown_hub_repo_gives_a_clear_error_naming_it(tmp_path, hub):
    with pytest.raises(RuntimeError, match="nobody/missing") as err:
        GPT.from_pretrained("nobody/missing", cache_dir=tmp_path, base_url=hub.url)
    assert "404" in str(err.value)
    assert not (tmp_path / "nobody" / "missing" / "model.safetensors").exists()


def test_an_unreachable_hub_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RuntimeError, match="could not download") as err:
        GPT.from_pretrained("tiny/gpt2", cache_dir=tmp_path, base_url=f"http://127.0.0.1:{port}")
    assert "tiny/gpt2" in str(err.value)


# --- malformed safetensors ---------------------------------------------------------------------

def good_file_bytes():
    return safetensors_bytes({"wte.weight": torch.arange(12.0).view(3, 4), "wpe.weight": torch.ones(2, 4)})


def with_header(header, body=b"\0" * 64):
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw)) + raw + body


def entry(shape, begin, end, dtype="F32"):
    return {"x": {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}}


MALFORMED = {
    "shorter than the length field": (b"\x10\0\0", "too short"),
    "truncated in the data": (good_file_bytes()[:-5], "outside the file"),
    "header length larger than the file": (struct.pack("<Q", 10_000) + b"{}", "header length"),
    "bad JSON": (with_header(b"{not json"), "bad JSON"),
    "header not a JSON object": (with_header(b"[1, 2, 3]"), "not a safetensors file"),
    "offsets out of range": (with_header(entry([2, 2], 56, 72)), "outside the file"),  # right size, past the end
    "offsets of the wrong size": (with_header(entry([2, 2], 0, 12)), "wrong size"),
    "unknown dtype": (with_header(entry([2], 0, 8, dtype="F12")), "malformed entry"),
    "negative dimension": (with_header(entry([-2, -2], 0, 16)), "malformed entry"),
}


def test_a_well_formed_file_round_trips(tmp_path):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(good_file_bytes())
    tensors = load_safetensors(path)
    assert set(tensors) == {"wte.weight", "wpe.weight"}  # __metadata__ is not a tensor
    assert torch.equal(tensors["wte.weight"], torch.arange(12.0).view(3, 4))


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_a_malformed_safetensors_file_gives_a_clear_value_error(tmp_path, case):
    data, message = MALFORMED[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=message) as err:
        load_safetensors(path)
    assert str(path) in str(err.value)  # the message says which file


# --- a path that is not there, and failed downloads, leave nothing behind ---------------------

def closed_port_url():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there now
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("name", ["{tmp}/x.safetensors", "{tmp}/a/b/weights", "./no-such.safetensors",
                                  "~/no-such-nanodepth-folder/x", "../no-such-folder"])
def test_a_local_path_that_is_not_there_is_no_file_not_a_hub_name(tmp_path, monkeypatch, name):
    monkeypatch.setenv("NANODEPTH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("NANODEPTH_HF_URL", closed_port_url())  # never the network
    monkeypatch.chdir(tmp_path)
    name = name.format(tmp=tmp_path)
    with pytest.raises(FileNotFoundError, match="no file at") as err:
        GPT.from_pretrained(name)
    assert name in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no cache, no folder named after it


def test_hub_names_are_still_hub_names():
    from gpt2_weights import looks_like_path
    assert not any(map(looks_like_path, ["gpt2", "gpt2-medium", "openai-community/gpt2"]))


@pytest.mark.parametrize("cache_exists", [False, True])
def test_a_failed_download_leaves_no_empty_folder_in_the_cache(tmp_path, hub, monkeypatch,
                                                                cache_exists):
    cache = tmp_path / "cache"
    if cache_exists:
        (cache / "gpt2").mkdir(parents=True)  # an earlier download's folder stays
    monkeypatch.setenv("NANODEPTH_CACHE", str(cache))
    with pytest.raises(RuntimeError, match="404"):
        GPT.from_pretrained("nobody/missing", base_url=hub.url)
    with pytest.raises(RuntimeError, match="could not download"):
        GPT.from_pretrained("gpt2-foo", base_url=closed_port_url())
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == (
        ["cache", "cache/gpt2"] if cache_exists else [])


def test_a_missing_init_from_path_is_one_line_in_sample_py(tmp_path):
    missing = tmp_path / "x.safetensors"
    env = dict(os.environ, NANODEPTH_CACHE=str(tmp_path / "cache"),
               NANODEPTH_HF_URL=closed_port_url(), NO_PROXY="127.0.0.1,localhost")
    done = subprocess.run([sys.executable, "sample.py", f"--init_from={missing}", "--device=cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"--init_from {missing}: no file at {missing}" in done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, is_weights", [
    ("gpt2", True), ("gpt2-medium", True), ("openai-community/gpt2", True),
    ("out", False), ("runs/ckpt.pt", False), ("./owner/name", False), ("scratch", False)])
def test_init_from_names_are_told_apart(name, is_weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # none of these exists here
    assert checkpoint.is_gpt2_weights(name) is is_weights
