"""
MindSkip gates (mindskip.py): the model starts exactly dense, the gates' extremes are the
dense and the skipped models, and generation decides on the prompt, reuses that decision,
leaves no cache for skipped layers and forgets it with the next prompt; settings and train.py.
Tiny configs, fixed seeds; the helpers here serve test_router_tuning.py (tuning) too.
"""

import pytest
import torch

import checkpoint
import train
from mindskip import TUNED_BUFFERS, MindSkipConfig, MindSkipGPT
from model import GPT, GPTConfig, KVCache

torch.set_num_threads(1)

TINY = dict(block_size=16, vocab_size=50, n_layer=4, n_head=2, n_embd=32, dropout=0.0, bias=True)
ROUTED = [1, 2]  # the default for 4 layers: n_layer // 2 layers ending before the last
SKIPS = ["attn", "mlp", "block"]
LEVELS = ["sequence", "token"]


def dense_gpt(seed=0, weight_std=0.3):
    """A tiny random dense GPT; spread-out weights give greedy decoding clear winners."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, weight_std)
    return model.eval()


def mindskip(dense, router_std=None, seed=0, **settings):
    """MindSkip on top of `dense`; router_std replaces the zero routers with random ones."""
    model = MindSkipGPT.from_dense(dense, MindSkipConfig(**settings)).eval()
    if router_std is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for router in model.routers.values():
                router.weight.copy_(router_std * torch.randn(router.weight.shape, generator=g))
    return model


def split_the_gates(model, idx, seed=0):
    """Set each router so that its scores on idx are centred over the rows (sequence level) or
    the tokens (token level): some gates open, others close. Random routers decide alike almost
    everywhere: position embeddings and LayerNorm biases give all features a shared part."""
    g = torch.Generator().manual_seed(seed)
    for i in model.gated:  # in order: a router changes only the inputs of later layers
        seen = []
        hook = model.routers[str(i)].register_forward_pre_hook(lambda m, inp: seen.append(inp[0]))
        with torch.no_grad():
            model(idx)
        hook.remove()
        mean = seen[0].reshape(-1, seen[0].size(-1)).mean(dim=0)  # (C,) the shared part
        u = torch.randn(mean.shape, generator=g)
        with torch.no_grad():
            model.routers[str(i)].weight.copy_(10 * (u - (u @ mean) / (mean @ mean) * mean))
    return model


def tokens(seed, batch, length):
    return torch.randint(TINY["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


def all_logits(model, idx, **kw):
    return model(idx, targets=torch.zeros_like(idx), **kw)[0]


def hand_forward_without_gated_sublayers(dense, idx, skip):
    """The dense model with the gated sublayer of every routed layer simply left out."""
    pos = torch.arange(idx.size(1))
    x = dense.transformer.wte(idx) + dense.transformer.wpe(pos)
    for i, block in enumerate(dense.transformer.h):
        gated = i in ROUTED
        if not (gated and skip in ("attn", "block")):
            x = x + block.attn(block.ln_1(x))
        if not (gated and skip in ("mlp", "block")):
            x = x + block.mlp(block.ln_2(x))
    return dense.lm_head(dense.transformer.ln_f(x))


def record_gates(model):
    """Forward hooks that append each router's decisions (True = open), keyed by layer."""
    opened = {i: [] for i in model.gated}
    for i in model.gated:
        model.routers[str(i)].register_forward_hook(lambda m, inp, out, i=i: opened[i].append(out[0].detach() > 0))
    return opened


# --- starting point and extremes -------------------------------------------------------------

@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("skip", SKIPS)
def test_zero_initialised_routers_reproduce_the_dense_model_bit_for_bit(skip, level):
    dense = dense_gpt()
    model = mindskip(dense, skip=skip, router_level=level)
    assert all(torch.count_nonzero(r.weight) == 0 for r in model.routers.values())
    idx = tokens(1, 3, 16)
    assert torch.equal(all_logits(model, idx), all_logits(dense, idx))
    with torch.no_grad():
        assert torch.equal(all_logits(model, idx), all_logits(dense, idx))


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("skip", SKIPS)
def test_gates_forced_open_give_the_dense_model(skip, level):
    dense = dense_gpt()
    model = mindskip(dense, router_std=3.0, skip=skip, router_level=level, gate_threshold=0.0)
    idx = tokens(2, 3, 16)
    assert torch.equal(all_logits(model, idx), all_logits(dense, idx))
    assert model.evaluate(idx, idx)["capacity"] == 1.0


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("skip", SKIPS)
def test_gates_forced_closed_give_the_model_without_those_sublayers(skip, level, grad):
    dense = dense_gpt()
    model = mindskip(dense, router_std=3.0, skip=skip, router_level=level, gate_threshold=1.5)
    idx = tokens(3, 3, 16)
    with torch.set_grad_enabled(grad):
        assert torch.equal(all_logits(model, idx), hand_forward_without_gated_sublayers(dense, idx, skip))
    assert model.evaluate(idx, idx)["capacity"] == 0.0


def test_some_gates_closed_change_the_output_and_the_realised_capacity_counts_them():
    dense = dense_gpt()
    idx = tokens(4, 8, 16)
    model = split_the_gates(mindskip(dense), idx)
    opened_at = record_gates(model)
    metrics = model.evaluate(idx, idx)
    opened = torch.cat([opened_at[i][0] for i in ROUTED])
    assert 0 < opened.float().mean() < 1  # a mix, so the numbers below mean something
    assert metrics["capacity"] == pytest.approx(opened.float().mean().item())
    assert not torch.equal(all_logits(model, idx), all_logits(dense, idx))


# --- generation --------------------------------------------------------------------------------

@pytest.mark.parametrize("skip", SKIPS)
def test_skipped_layers_write_no_kv_cache_and_open_rows_cache_every_token(skip):
    dense = dense_gpt()
    idx = tokens(8, 8, 12)
    model = split_the_gates(mindskip(dense, skip=skip), idx[:, :9])
    opened_at = record_gates(model)
    cache = model.new_cache()
    model(idx[:, :9], cache=cache)
    for t in range(9, 12):
        model(idx[:, t:t + 1], cache=cache, pos_offset=t)
    opened = {i: opened_at[i][0] for i in ROUTED}  # made at prefill
    assert any(o.any() and not o.all() for o in opened.values())  # some rows skip, some do not
    per_token_row = 2 * TINY["n_embd"] * 4  # key + value, float32
    for i in range(TINY["n_layer"]):
        gated_attention = i in ROUTED and skip != "mlp"
        rows = int(opened[i].sum()) if gated_attention else 8
        if rows == 0:
            assert i not in cache.kv
        else:
            assert cache.kv[i].k.size(0) == rows and len(cache.kv[i]) == 12
    gated_rows = sum(int(opened[i].sum()) for i in ROUTED) if skip != "mlp" else 8 * len(ROUTED)
    assert cache.nbytes() == 12 * per_token_row * (8 * (TINY["n_layer"] - len(ROUTED)) + gated_rows)


@pytest.mark.parametrize("skip", ["attn", "block"])
def test_token_level_skipped_tokens_leave_no_key_in_that_layer(skip):
    dense = dense_gpt()
    idx = tokens(9, 3, 12)
    model = split_the_gates(mindskip(dense, skip=skip, router_level="token"), idx)
    opened_at = record_gates(model)
    cache = model.new_cache()
    model(idx[:, :7], cache=cache)
    for t in range(7, 12):
        model(idx[:, t:t + 1], cache=cache, pos_offset=t)
    for i in ROUTED:
        opened = torch.cat(opened_at[i], dim=1)  # (3, 12)
        assert 0 < opened.float().mean() < 1
        for b in range(3):
            n_open = int(opened[b].sum())
            assert len(cache.kv[i].row(b) if i in cache.kv else KVCache()) == n_open


@pytest.mark.parametrize("skip", SKIPS)
def test_decode_reuses_the_prompt_decisions_and_matches_recomputation_with_them(skip):
    """Recomputing the whole sequence would re-decide on it; with the prompt's decisions
    replayed through new_cache(decisions=...), it must give the cached logits and tokens."""
    dense = dense_gpt()
    prompt = tokens(10, 6, 5)
    model = split_the_gates(mindskip(dense, skip=skip), prompt)
    opened_at = record_gates(model)
    generated = model.generate(prompt, max_new_tokens=10, temperature=0.0, use_cache=True)
    assert all(len(s) == 1 for s in opened_at.values())  # routers ran on the prompt only
    first = model.new_cache()
    model(prompt, cache=first)
    decisions = first.decisions
    assert any(d.any() and not d.all() for d in decisions.values())
    cache = model.new_cache()
    cached_logits = [model(prompt, cache=cache)[0]]
    for t in range(5, 15):
        cached_logits.append(model(generated[:, t:t + 1], cache=cache, pos_offset=t)[0])
    assert all(torch.equal(cache.decisions[i], decisions[i]) for i in ROUTED)
    for t in range(5, 15):
        replay = model(generated[:, :t], cache=model.new_cache(decisions=decisions))[0]
        torch.testing.assert_close(cached_logits[t - 5], replay, rtol=1e-5, atol=1e-5)
        assert torch.equal(replay[:, -1].argmax(-1), generated[:, t])


@pytest.mark.parametrize("skip", SKIPS)
def test_uncached_generation_decides_sequence_gates_on_the_prompt_as_cached_generation_does(skip):
    """Recomputing the window each step must not re-decide on the growing text: the same
    tokens as the cached path, also past block_size where both decide again on the window."""
    dense = dense_gpt()
    prompt = tokens(15, 6, 5)
    model = split_the_gates(mindskip(dense, skip=skip), prompt)
    cached = model.generate(prompt, max_new_tokens=14, temperature=0.0, use_cache=True)  # slides past 16
    uncached = model.generate(prompt, max_new_tokens=14, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached)
    redecided = prompt  # the window recomputed and re-decided at every step
    for _ in range(14):
        logits = model(redecided[:, -TINY["block_size"]:])[0]
        redecided = torch.cat((redecided, logits[:, -1].argmax(-1, keepdim=True)), dim=1)
    assert not torch.equal(redecided, cached)  # deciding on the whole window would differ here


@pytest.mark.parametrize("skip", SKIPS)
def test_token_level_cached_generation_equals_recomputing_the_window(skip):
    dense = dense_gpt()
    prompt = tokens(11, 3, 5)
    model = split_the_gates(mindskip(dense, skip=skip, router_level="token"), prompt)
    opened_at = record_gates(model)
    cached = model.generate(prompt, max_new_tokens=14, temperature=0.0, use_cache=True)  # slides past 16
    assert all(0.2 < torch.cat(opened_at[i], dim=1).float().mean() < 0.8 for i in ROUTED)
    uncached = model.generate(prompt, max_new_tokens=14, temperature=0.0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_decisions_do_not_leak_from_one_prompt_to_the_next():
    dense = dense_gpt()
    prompts = tokens(12, 8, 6)
    model = split_the_gates(mindskip(dense), prompts)
    cache = model.new_cache()
    model(prompts, cache=cache)
    rows = torch.stack([cache.decisions[i] for i in ROUTED], dim=1)  # (8, layers)
    b = next(r for r in range(1, 8) if not torch.equal(rows[r], rows[0]))  # decides otherwise than row 0
    a, b = prompts[[0]], prompts[[b]]
    alone = model.generate(b, max_new_tokens=8, temperature=0.0)
    model.generate(a, max_new_tokens=8, temperature=0.0)
    after_a = model.generate(b, max_new_tokens=8, temperature=0.0)
    assert torch.equal(after_a, alone)
    assert model.new_cache().decisions == {} and model.new_cache().nbytes() == 0


# --- settings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    (dict(skip="heads"), "--skip"),
    (dict(router_level="batch"), "--router_level"),
    (dict(target_capacity=1.5), "--target_capacity"),
    (dict(sparsity_coef=-1.0), "--sparsity_coef"),
    (dict(gate_threshold=-0.1), "--gate_threshold"),
    (dict(skip_layers="3,x"), "--skip_layers"),
    (dict(skip_layers="2,2"), "twice"),
])
def test_bad_settings_raise_a_value_error_naming_the_flag(settings, message):
    with pytest.raises(ValueError, match=message):
        MindSkipConfig(**settings)


def test_a_layer_outside_the_model_is_refused_when_the_model_is_built():
    with pytest.raises(ValueError, match="names layer 4, but the model has layers 0..3"):
        MindSkipGPT(GPTConfig(**TINY), MindSkipConfig(skip_layers="1,4"))
    with pytest.raises(ValueError, match="--skip_layers"):
        MindSkipGPT(GPTConfig(**{**TINY, "n_layer": 1}), MindSkipConfig())


def test_default_layers_are_the_upper_half_minus_the_last_and_explicit_ones_are_kept():
    assert MindSkipConfig().gated_layers(12) == [5, 6, 7, 8, 9, 10]
    assert MindSkipConfig().gated_layers(4) == ROUTED
    assert MindSkipConfig(skip_layers=" 2, 0").gated_layers(4) == [0, 2]


def test_gating_the_last_layer_is_refused_as_the_official_code_never_gates_it():
    with pytest.raises(ValueError, match="--skip_layers '1,3' gates the last layer"):
        MindSkipGPT(GPTConfig(**TINY), MindSkipConfig(skip_layers="1,3"))


def test_a_cache_in_training_mode_is_refused():
    model = mindskip(dense_gpt()).train()
    with pytest.raises(ValueError, match="model.eval"):
        model(tokens(1, 1, 4), cache=model.new_cache())


# --- train.py ----------------------------------------------------------------------------------

def test_train_py_tunes_only_the_routers_of_a_dense_checkpoint_and_reloads_base_plus_routers(dataset, tmp_path, capsys):
    common = dict(dataset=dataset, n_layer=4, n_head=2, n_embd=32, block_size=16, batch_size=4, warmup_iters=1,
                  eval_interval=4, eval_iters=1, device="cpu")

    def run(**flags):
        train.main([f"--{k}={v}" for k, v in {**common, **flags}.items()])

    run(out_dir=tmp_path / "base", max_iters=4, lr_decay_iters=4)
    with pytest.raises(SystemExit):
        run(out_dir=tmp_path / "scratch", variant="router_tuning", max_iters=2)
    assert "--init_from" in capsys.readouterr().err
    run(out_dir=tmp_path / "tuned", variant="router_tuning", init_from=tmp_path / "base", max_iters=4,
        lr_decay_iters=4, learning_rate=0.1, train_samples=20, sparsity_coef=5.0)
    ckpt = torch.load(tmp_path / "tuned" / "ckpt.pt", weights_only=True)
    assert set(ckpt["model"]) == {f"routers.{i}.weight" for i in ROUTED} | set(TUNED_BUFFERS)
    assert ckpt["base"]["sha256"] == checkpoint.file_sha256(tmp_path / "base" / "ckpt.pt")
    base, _ = checkpoint.load_model(tmp_path / "base")
    tuned, _ = checkpoint.load_model(tmp_path / "tuned")
    assert isinstance(tuned, MindSkipGPT)
    for k, v in base.state_dict().items():
        assert torch.equal(tuned.state_dict()[k], v), k
    for k, v in ckpt["model"].items():
        assert torch.equal(tuned.state_dict()[k], v) and torch.count_nonzero(v) > 0, k


@pytest.mark.parametrize("level", ["sequence", "token"])
@pytest.mark.parametrize("skip, sublayers_per_gate", [("attn", 1), ("mlp", 1), ("block", 2)])
def test_depth_per_token_counts_the_sublayers_the_gates_skip(skip, sublayers_per_gate, level):
    idx = torch.randint(0, TINY["vocab_size"], (2, 10), generator=torch.Generator().manual_seed(0))
    open_model = mindskip(dense_gpt(), skip=skip, router_level=level)  # zero routers: every gate open
    assert torch.equal(open_model.depth_per_token(idx, prompt_len=4), torch.ones(2, 10))
    closed = mindskip(dense_gpt(), skip=skip, router_level=level, gate_threshold=1.5)  # every gate shut
    expected = 1 - sublayers_per_gate * len(ROUTED) / (2 * TINY["n_layer"])
    torch.testing.assert_close(closed.depth_per_token(idx, prompt_len=4), torch.full((2, 10), expected))
