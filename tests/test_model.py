"""
GPT-2 baseline (model.py): shapes, weight tying, loading Hugging Face-layout weights (from a
directory and through a local stand-in for the hub), malformed safetensors, the KV cache,
and the training utilities. Everything is offline, tiny and seeded.
"""

import http.server
import json
import math
import socket
import struct
import threading
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from gpt2_weights import load_safetensors
from model import GPT, GPTConfig, KVCache, block_matmul_params

torch.set_num_threads(1)

TINY = dict(block_size=16, vocab_size=50, n_layer=2, n_head=4, n_embd=32, dropout=0.0, bias=True)


def tiny_gpt(seed=0, weight_std=None, **overrides):
    """A tiny random GPT. weight_std spreads the weights so that greedy decoding has clear
    winners (the default 0.02 init gives near-uniform logits and near ties)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides}))
    if weight_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0.0, weight_std)
    return model.eval()


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


def all_logits(model, idx, cache=None, pos_offset=0):
    dummy_targets = torch.zeros(idx.shape, dtype=torch.long)  # only to get every position's logits
    logits, _, _ = model(idx, targets=dummy_targets, cache=cache, pos_offset=pos_offset)
    return logits


def sample_tokens(seed, B, T, vocab_size):
    return torch.randint(vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# --- forward / backward ------------------------------------------------------------------------

def test_forward_with_targets_gives_logits_for_every_position_and_a_finite_loss():
    model = tiny_gpt()
    idx = sample_tokens(1, 3, 10, TINY["vocab_size"])
    targets = sample_tokens(2, 3, 10, TINY["vocab_size"])
    logits, loss, aux = model(idx, targets=targets)
    assert logits.shape == (3, 10, TINY["vocab_size"])
    assert loss.shape == () and torch.isfinite(loss)
    assert aux == {} and model.loss_weights == {}
    # at init the model is close to uniform over the vocabulary
    assert abs(loss.item() - math.log(TINY["vocab_size"])) < 0.1


def test_backward_reaches_every_parameter_with_its_own_shape():
    model = tiny_gpt().train()
    idx = sample_tokens(1, 2, 12, TINY["vocab_size"])
    _, loss, _ = model(idx, targets=idx)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.shape == p.shape, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_logits_without_targets_are_the_last_position_only():
    model = tiny_gpt()
    idx = sample_tokens(2, 2, 9, TINY["vocab_size"])
    last, loss, _ = model(idx)
    assert loss is None
    assert last.shape == (2, 1, TINY["vocab_size"])
    torch.testing.assert_close(last, all_logits(model, idx)[:, -1:], rtol=0, atol=1e-6)


def test_targets_of_minus_one_are_ignored_by_the_loss():
    model = tiny_gpt()
    idx = sample_tokens(3, 2, 8, TINY["vocab_size"])
    targets = idx.clone()
    targets[:, :4] = -1
    logits, loss, _ = model(idx, targets=targets)
    expected = F.cross_entropy(logits[:, 4:].reshape(-1, logits.size(-1)), idx[:, 4:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_targets_may_be_a_slice_of_a_larger_batch():
    model = tiny_gpt()
    batch = sample_tokens(3, 2, 12, TINY["vocab_size"])
    targets = batch[:, 1:9]  # not contiguous in memory
    _, loss, _ = model(batch[:, :8], targets=targets)
    _, expected, _ = model(batch[:, :8], targets=targets.contiguous())
    torch.testing.assert_close(loss, expected)


def test_lm_head_and_token_embedding_share_one_tensor():
    model = tiny_gpt()
    assert model.lm_head.weight is model.transformer.wte.weight
    n_unique = len({p.data_ptr() for p in model.parameters()})
    assert n_unique == len(list(model.parameters()))  # the tied tensor is counted once
    with torch.no_grad():
        model.transformer.wte.weight[3].fill_(0.5)
    assert torch.equal(model.lm_head.weight[3], torch.full((TINY["n_embd"],), 0.5))


def test_block_output_is_its_input_plus_the_attention_then_mlp_updates():
    model = tiny_gpt(weight_std=0.3)
    block = model.transformer.h[0]
    x = torch.randn(2, 7, TINY["n_embd"], generator=torch.Generator().manual_seed(4))
    h = x + block.attn_update(x)
    torch.testing.assert_close(block(x), h + block.mlp_update(h))


def test_a_sequence_longer_than_block_size_is_refused():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, TINY["block_size"] + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=model.new_cache(), pos_offset=TINY["block_size"] - 1)


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


# --- KV cache ----------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt_len", [1, 5, 15, 16, 21])
def test_cached_greedy_generation_equals_recomputing_the_window(prompt_len):
    """Runs past block_size (16), so the window slides and the cache restarts."""
    model = tiny_gpt(seed=7, weight_std=0.3)
    prompt = sample_tokens(prompt_len, 2, prompt_len, TINY["vocab_size"])
    cached = model.generate(prompt, max_new_tokens=24, temperature=0.0, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=24, temperature=0.0, use_cache=False)
    assert cached.shape == (2, prompt_len + 24)
    assert torch.equal(cached, uncached)
    assert len(set(cached[0, prompt_len:].tolist())) > 1  # not a degenerate repeat of one token


def test_prefill_then_decode_gives_the_full_forward_logits_at_every_position():
    model = tiny_gpt(seed=8, weight_std=0.3)
    idx = sample_tokens(9, 2, 13, TINY["vocab_size"])
    full = all_logits(model, idx)
    cache = model.new_cache()
    prefill = all_logits(model, idx[:, :5], cache=cache)
    chunk = all_logits(model, idx[:, 5:8], cache=cache, pos_offset=5)  # several new tokens at once
    steps = [model(idx[:, t:t + 1], cache=cache, pos_offset=t)[0] for t in range(8, 13)]
    cached = torch.cat([prefill, chunk, *steps], dim=1)
    assert prefill.shape == (2, 5, TINY["vocab_size"])
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


def test_kv_cache_grows_by_one_key_and_one_value_per_token_and_layer():
    model = tiny_gpt(seed=10)
    B, C = 3, TINY["n_embd"]
    per_token = 2 * B * C * 4  # key + value, float32, all heads
    idx = sample_tokens(11, B, 9, TINY["vocab_size"])
    cache = model.new_cache()
    assert len(cache) == TINY["n_layer"] and all(isinstance(c, KVCache) for c in cache)
    assert all(len(c) == 0 and c.nbytes() == 0 for c in cache)
    model(idx[:, :6], cache=cache)
    assert all(len(c) == 6 and c.nbytes() == 6 * per_token for c in cache)
    for t in range(6, 9):
        model(idx[:, t:t + 1], cache=cache, pos_offset=t)
        assert all(len(c) == t + 1 and c.nbytes() == (t + 1) * per_token for c in cache)


# --- training utilities ------------------------------------------------------------------------

def test_crop_block_size_keeps_the_first_positions_and_refuses_longer_inputs():
    model = tiny_gpt(seed=12, weight_std=0.3)
    idx = sample_tokens(13, 2, 8, TINY["vocab_size"])
    before = all_logits(model, idx)
    wpe_before = model.transformer.wpe.weight[:8].clone()
    model.crop_block_size(8)
    assert model.config.block_size == 8
    assert model.transformer.wpe.weight.shape == (8, TINY["n_embd"])
    assert torch.equal(model.transformer.wpe.weight, wpe_before)
    torch.testing.assert_close(all_logits(model, idx), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="block_size"):
        model(sample_tokens(13, 1, 9, TINY["vocab_size"]))


def test_configure_optimizers_skips_frozen_params_and_decays_only_matrices():
    model = tiny_gpt()
    frozen = [model.transformer.h[0].attn.c_attn.weight, model.transformer.h[0].ln_1.bias,
              model.transformer.wpe.weight]
    for p in frozen:
        p.requires_grad_(False)
    opt = model.configure_optimizers(weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type="cpu")
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in opt.param_groups}
    assert set(by_decay) == {0.1, 0.0}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert by_decay[0.1] == {id(p) for p in trainable if p.dim() >= 2}
    assert by_decay[0.0] == {id(p) for p in trainable if p.dim() == 1}
    assert not {id(p) for p in frozen} & (by_decay[0.1] | by_decay[0.0])
    n_listed = sum(len(g["params"]) for g in opt.param_groups)
    assert n_listed == len(trainable)  # the tied wte/lm_head tensor appears once


def test_block_matmul_params_counts_the_weights_of_a_block():
    model = tiny_gpt()
    block = model.transformer.h[0]
    weights = [block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj]
    assert block_matmul_params(TINY["n_embd"]) == sum(m.weight.numel() for m in weights)


def test_flops_per_token_follows_the_design_convention():
    model = GPT(GPTConfig(block_size=4, vocab_size=10, n_layer=2, n_head=2, n_embd=8))
    # per layer: 6 * 12 * 8^2 = 4608 (matmuls) + 12 * 8 * 4 = 384 (attention over T=4 keys);
    # two layers: 9984; LM head: 6 * 8 * 10 = 480; embeddings and norms are free
    assert model.flops_per_token() == 10464
    # at T=2 the attention term halves: 2 * (4608 + 192) + 480
    assert model.flops_per_token(seq_len=2) == 10080
