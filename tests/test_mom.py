"""Mixture-of-Modules: the properties the design notes list, on tiny models with fixed seeds."""

import math

import pytest
import torch
import torch.nn as nn

from model import GPT, GPTConfig, RowKVCache
from mom import MoMConfig, MoMGPT
from router import switch_balance_loss

CFG = dict(block_size=16, vocab_size=32, n_layer=3, n_head=2, n_embd=16, dropout=0.0)
# (layout settings, n_layer): single pool; dense bottom/top; two chunks with their anchors
LAYOUTS = [(dict(), 3), (dict(bottom_layers=1, top_layers=1), 5), (dict(chunks=2, top_layers=1), 7)]


def tiny_dense(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**CFG, **overrides})).eval()


def tiny_mom(seed=0, skip_bias=0.0, n_layer=3, **settings):
    """A random MoM; skip_bias raises the SKIP logit of both routers so SKIP actually happens."""
    torch.manual_seed(seed)
    model = MoMGPT(GPTConfig(**{**CFG, "n_layer": n_layer}), MoMConfig(**settings)).eval()
    with torch.no_grad():
        for chunk in model.chunks:
            for router in (chunk.attn_router, chunk.ffn_router):
                router.out.weight.mul_(50)  # sharper than at init: choices differ from token to token
                router.out.bias[-1] += skip_bias
    return model


def tokens(B=2, T=16, seed=1):
    return torch.randint(0, CFG["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


class FixedRouter(nn.Module):
    """Stands in for a router: step h returns logits[h] (or the same logits at every step)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x, state, step):
        logits = self.logits[step] if isinstance(self.logits, list) else self.logits
        return logits.expand(*x.shape[:2], -1), state

    def matmul_params(self):
        return 0


def one_choice(index, n_choices):
    """Logits whose softmax is exactly one-hot: probability (and so weight) 1 on `index`."""
    return torch.full((n_choices,), -float("inf")).index_fill(0, torch.tensor(index), 0.0)


def force(mom, attn, ffn):
    """Every token takes attention choice attn(h) and FFN choice ffn(h) at step h, with weight 1
    (K = 1: with K > 1 top-K would also pick zero-probability choices)."""
    for chunk in mom.chunks:
        for name, pick, pool in (("attn_router", attn, chunk.attn_pool), ("ffn_router", ffn, chunk.ffn_pool)):
            n = len(pool) + 1
            setattr(chunk, name, FixedRouter([one_choice(pick(h, len(pool)), n) for h in range(chunk.steps)]))
    return mom


def dense_order(h, n):
    return h


def skip(h, n):
    return n


@pytest.mark.parametrize("assembly", ["per_module", "official"])
@pytest.mark.parametrize("layout, n_layer", LAYOUTS)
def test_reduces_exactly_to_the_dense_model_when_step_h_is_forced_to_module_h(layout, n_layer, assembly):
    dense = tiny_dense(n_layer=n_layer)
    mom = force(MoMGPT.from_dense(dense, MoMConfig(attn_assembly=assembly, **layout)).eval(), dense_order, dense_order)
    idx = tokens()
    dense_logits, dense_loss, _ = dense(idx, idx)
    mom_logits, mom_loss, _ = mom(idx, idx)
    torch.testing.assert_close(mom_logits, dense_logits, rtol=0, atol=1e-6)
    assert abs(mom_loss.item() - dense_loss.item()) < 1e-6


@pytest.mark.parametrize("assembly", ["per_module", "official"])
def test_forced_skip_leaves_the_hidden_state_unchanged(assembly):
    mom = force(tiny_mom(attn_assembly=assembly), skip, skip)
    x = torch.randn(2, 16, CFG["n_embd"])
    out, _ = mom.forward_trunk(x)
    assert torch.equal(out, x)


def test_a_module_nobody_chose_is_never_run():
    mom = force(tiny_mom(), lambda h, n: 0, lambda h, n: 0)
    calls = []
    for pool in (mom.chunks[0].attn_pool, mom.chunks[0].ffn_pool):
        for module in pool[1:]:
            module.register_forward_hook(lambda *_: calls.append(1))
            for child in module.children():
                child.register_forward_hook(lambda *_: calls.append(1))
    mom(tokens())
    assert calls == []


def heads(mom, qkv_i, qkv_keys, C):
    """Causal attention of one query over a list of keys, head by head."""
    nh = CFG["n_head"]
    hs = C // nh
    y = torch.zeros(C)
    for h in range(nh):
        sl = slice(h * hs, (h + 1) * hs)
        scores = torch.stack([qkv_i[:C][sl] @ k[C:2 * C][sl] for k in qkv_keys]) / math.sqrt(hs)
        y[sl] = sum(a * k[2 * C:][sl] for a, k in zip(scores.softmax(0), qkv_keys))
    return y


def hand_attention(mom, x, chosen, probs):
    """per_module, token by token: the k-th choices of all tokens form assembly k; token i
    attends over the earlier-or-same tokens whose k-th choice is not SKIP."""
    T, C = x.shape
    pool = mom.chunks[0].attn_pool
    out = torch.zeros_like(x)
    for k in range(chosen.size(-1)):
        qkv = {j: pool[m].attn.c_attn(pool[m].ln_1(x[j])) for j in range(T)
               if (m := chosen[j, k].item()) != len(pool)}
        for i in qkv:
            y = heads(mom, qkv[i], [qkv[j] for j in qkv if j <= i], C)
            m = chosen[i, k].item()
            out[i] += probs[i, m] * pool[m].attn.c_proj(y)
    return out


def hand_official_attention(mom, x, chosen, probs):
    """official, token by token: q/k/v = sum of the chosen modules' q/k/v (SKIP adds zeros);
    every token attends over every earlier-or-same token; each chosen module projects it."""
    T, C = x.shape
    pool = mom.chunks[0].attn_pool
    qkv = [sum((pool[m].attn.c_attn(pool[m].ln_1(x[j])) for m in chosen[j].tolist() if m != len(pool)),
               torch.zeros(3 * C)) for j in range(T)]
    out = torch.zeros_like(x)
    for i in range(T):
        y = heads(mom, qkv[i], qkv[:i + 1], C)
        for m in chosen[i].tolist():
            if m != len(pool):
                out[i] += probs[i, m] * pool[m].attn.c_proj(y)
    return out


def hand_ffn(mom, x, chosen, probs):
    pool = mom.chunks[0].ffn_pool
    out = torch.zeros_like(x)
    for j in range(x.size(0)):
        for m in chosen[j].tolist():
            if m != len(pool):
                out[j] += probs[j, m] * pool[m].mlp(pool[m].ln_2(x[j]))
    return out


@pytest.mark.parametrize("assembly, hand", [("per_module", hand_attention), ("official", hand_official_attention)])
def test_k2_assembly_matches_a_hand_computation(assembly, hand):
    torch.manual_seed(0)
    mom = MoMGPT(GPTConfig(**CFG), MoMConfig(n_attn_modules=2, n_ffn_modules=2, assembly_steps=1,
                                             modules_per_step=2, attn_assembly=assembly)).eval()
    T = 6
    # rows = tokens, columns = (module 0, module 1, SKIP); mixes of modules, SKIP first or second
    attn_logits = torch.tensor([[2.0, 1, 0], [0, 2, 1], [1, 0, 2], [0, 1, 3], [3, 0, 1], [1, 3, 2]])
    ffn_logits = torch.tensor([[0.0, 2, 1], [2, 1, 0], [0, 1, 2], [1, 0, 3], [1, 2, 0], [3, 0, 1]])
    mom.chunks[0].attn_router = FixedRouter(attn_logits[None])
    mom.chunks[0].ffn_router = FixedRouter(ffn_logits[None])
    x = torch.randn(1, T, CFG["n_embd"])
    with torch.no_grad():
        out, _ = mom.forward_trunk(x)
        attn_probs, ffn_probs = attn_logits.softmax(-1), ffn_logits.softmax(-1)
        h = x[0] + hand(mom, x[0], attn_probs.topk(2).indices, attn_probs)
        expected = h + hand_ffn(mom, h, ffn_probs.topk(2).indices, ffn_probs)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)


def test_official_and_per_module_attention_agree_with_k1_and_no_skip():
    a, b = tiny_mom(attn_assembly="per_module"), tiny_mom(attn_assembly="official")
    b.load_state_dict(a.state_dict())
    for mom in (a, b):
        force(mom, lambda h, n: (h + 1) % n, lambda h, n: (2 * h) % n)
    idx = tokens()
    torch.testing.assert_close(a(idx, idx)[0], b(idx, idx)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "gru"])
def test_routers_get_gradient_from_the_lm_loss_alone_with_k1(kind):
    mom = tiny_mom(router_kind=kind).train()
    idx = tokens()
    _, loss, _ = mom(idx, idx)
    loss.backward()  # the LM loss only: no balance term
    for router in (mom.chunks[0].attn_router, mom.chunks[0].ffn_router):
        grads = [p.grad for p in router.parameters()]
        assert all(g is not None for g in grads)
        # well above round-off: a renormalised K=1 weight p/p still leaks ~1e-10 of gradient
        assert max(g.abs().max().item() for g in grads) > 1e-6


@pytest.mark.parametrize("K", [1, 2])
def test_balance_loss_is_one_for_uniform_routing_and_n_over_k_for_collapse(K):
    N, tokens_ = 6, 60
    uniform = torch.full((tokens_, N), 1.0 / N)
    spread = (torch.arange(tokens_)[:, None] * K + torch.arange(K)) % N  # every option chosen equally often
    assert abs(switch_balance_loss(uniform, spread, N).item() - 1.0) < 1e-6
    collapsed = torch.zeros(tokens_, N)
    collapsed[:, :K] = 1.0 / K  # every token puts all its probability on the same K options
    same_k = torch.arange(K).expand(tokens_, K)
    assert abs(switch_balance_loss(collapsed, same_k, N).item() - N / K) < 1e-6


def test_model_balance_loss_counts_skip_as_a_class():
    mom = force(tiny_mom(), skip, skip)  # 3 modules + SKIP per pool; everyone collapses onto SKIP
    _, _, aux = mom(tokens())
    assert abs(aux["mom_balance"].item() - (CFG["n_layer"] + 1)) < 1e-6
    assert mom.loss_weights == {"mom_balance": 0.01}


@pytest.mark.parametrize("balance_over, expected", [("pool", 4 / 3), ("steps", 4.0)])
def test_pooled_balance_scores_the_dense_order_as_balanced_and_per_step_as_collapse(balance_over, expected):
    # module h at step h: over the 3 steps each module gets a third of the choices (4 choices
    # with SKIP: 4 * 3 * (1/3)^2), while every single step collapses onto one module (4)
    mom = force(tiny_mom(balance_over=balance_over), dense_order, dense_order)
    _, _, aux = mom(tokens())
    assert abs(aux["mom_balance"].item() - expected) < 1e-6


@pytest.mark.parametrize("kind", ["mlp", "gru"])
def test_permuting_modules_together_with_router_outputs_changes_nothing(kind):
    mom = tiny_mom(modules_per_step=2, router_kind=kind, skip_bias=1.0)
    idx = tokens()
    before, _, _ = mom(idx, idx)
    perm = [2, 0, 1]
    chunk = mom.chunks[0]
    with torch.no_grad():
        for pool, router in ((chunk.attn_pool, chunk.attn_router), (chunk.ffn_pool, chunk.ffn_router)):
            rows = perm + [len(pool)]  # SKIP stays last
            router.out.weight.copy_(router.out.weight[rows])
            router.out.bias.copy_(router.out.bias[rows])
            modules = list(pool)
            for i, p in enumerate(perm):
                pool[i] = modules[p]
    after, _, _ = mom(idx, idx)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("K, assembly, layout, n_layer, B", [
    (1, "per_module", {}, 3, 2), (2, "per_module", {}, 3, 2), (2, "official", {}, 3, 2),
    (1, "per_module", dict(chunks=2, bottom_layers=1), 7, 2),
    # batch 1 decodes through MoMChunk.decode_one_token
    (1, "per_module", {}, 3, 1), (2, "per_module", {}, 3, 1), (1, "official", {}, 3, 1), (2, "official", {}, 3, 1),
    (1, "per_module", dict(chunks=2, bottom_layers=1), 7, 1)])
def test_cached_decoding_matches_the_full_forward(K, assembly, layout, n_layer, B):
    mom = tiny_mom(modules_per_step=K, skip_bias=1.0, attn_assembly=assembly, n_layer=n_layer, **layout)
    idx = tokens(B=B, T=16)
    full, _, _ = mom(idx, idx)  # logits at every position
    cache = mom.new_cache()
    logits, _, _ = mom(idx[:, :5], cache=cache)  # prefill
    steps = [logits[:, -1]]
    for t in range(5, 16):
        logits, _, _ = mom(idx[:, t:t + 1], cache=cache, pos_offset=t)
        steps.append(logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], rtol=1e-5, atol=1e-5)
    mom(idx)  # the full forward routes every token as the cached run did, one token at a time
    kept = sum(mom.kept(r)[0].sum().item() for r in mom.last_routing)
    total = sum(r["attn"].numel() for r in mom.last_routing)
    assert 0 < kept < total  # the routing saw SKIPs
    step_caches = [c for chunk in cache.steps for c in chunk]  # RowKVCache (per_module), KVCache
    routed_keys = sum(sum(map(len, c.rows.values())) if isinstance(c, RowKVCache) else len(c)
                      for c in step_caches)
    if assembly == "per_module":  # a SKIP wrote nothing: the cache holds exactly the non-SKIP choices
        assert routed_keys == kept
    else:  # official: one cache per step for the batch, every token a key (zeros for SKIP)
        assert routed_keys == 16 * mom.settings.assembly_steps


def test_cached_greedy_generation_equals_recomputation():
    mom = tiny_mom(skip_bias=1.0)
    prompt = tokens(T=4)
    cached = mom.generate(prompt, 10, temperature=0, use_cache=True)
    recomputed = mom.generate(prompt, 10, temperature=0, use_cache=False)
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("assembly", ["per_module", "official"])
def test_changing_future_tokens_never_changes_earlier_logits(assembly):
    mom = tiny_mom(modules_per_step=2, skip_bias=1.0, attn_assembly=assembly)
    a = tokens()
    b = a.clone()
    b[:, 10:] = (b[:, 10:] + 1) % CFG["vocab_size"]
    la, _, _ = mom(a, a)
    lb, _, _ = mom(b, b)
    torch.testing.assert_close(la[:, :10], lb[:, :10], rtol=0, atol=1e-6)


def test_evaluate_reports_routing_and_flops_from_the_actual_routing():
    idx = tokens()
    mom = force(tiny_mom(), dense_order, dense_order)
    dense_like = mom.evaluate(idx, idx)
    assert dense_like["skip_rate"] == 0 and dense_like["modules_used"] == 1
    assert dense_like["flops_per_token"] == tiny_dense().flops_per_token(seq_len=idx.size(1))  # fixed routers: free
    skipped = force(tiny_mom(), skip, skip).evaluate(idx, idx)
    assert skipped["skip_rate"] == 1 and skipped["modules_used"] == 0
    assert skipped["flops_per_token"] == 6 * CFG["n_embd"] * CFG["vocab_size"]  # only the head remains


@pytest.mark.parametrize("layout, n_layer", LAYOUTS)
def test_ceiling_flops_equal_the_dense_model_plus_routers_when_h_equals_the_chunk_depth(layout, n_layer):
    mom = tiny_mom(n_layer=n_layer, **layout)
    dense = tiny_dense(n_layer=n_layer)
    routers = sum(6 * c.steps * (c.attn_router.matmul_params() + c.ffn_router.matmul_params()) for c in mom.chunks)
    assert mom.flops_per_token() == dense.flops_per_token() + routers


def test_smaller_pools_are_built_from_evenly_spaced_dense_layers():
    dense = tiny_dense(n_layer=4)
    mom = MoMGPT.from_dense(dense, MoMConfig(n_attn_modules=2, n_ffn_modules=3))  # 50% / 75%, the paper's ablation
    chunk = mom.chunks[0]
    assert (len(chunk.attn_pool), len(chunk.ffn_pool), chunk.steps) == (2, 3, 4)
    layers = dense.transformer.h
    for pool, sources, parts in ((chunk.attn_pool, [0, 2], ("ln_1", "attn")), (chunk.ffn_pool, [0, 1, 2], ("ln_2", "mlp"))):
        for module, i in zip(pool, sources):
            for part in parts:
                for a, b in zip(module[part].parameters(), getattr(layers[i], part).parameters()):
                    assert torch.equal(a, b)
    idx = tokens()
    _, loss, aux = mom.train()(idx, idx)
    (loss + aux["mom_balance"]).backward()
    assert torch.isfinite(loss)


def test_layer_order_init_starts_each_step_near_its_dense_layer():
    dense = tiny_dense()
    mom = MoMGPT.from_dense(dense, MoMConfig(router_init="layer_order", router_kind="mlp")).eval()
    mom(tokens())
    for pool in ("attn", "ffn"):
        chosen = mom.last_routing[0][pool][..., 0]  # (H, B, T)
        for h in range(3):
            assert (chosen[h] == h).float().mean() > 0.9
    fresh = MoMGPT.from_dense(dense, MoMConfig())
    assert not any("step_bias" in name for name, _ in fresh.named_parameters())


@pytest.mark.parametrize("settings, flag", [
    (dict(modules_per_step=5, n_attn_modules=3), "--modules_per_step"),
    (dict(modules_per_step=0), "--modules_per_step"),
    (dict(router_kind="lstm"), "--router_kind"),
    (dict(balance_coef=-1.0), "--balance_coef"),
    (dict(assembly_steps=-2), "--assembly_steps"),
    (dict(balance_over="layer"), "--balance_over"),
    (dict(attn_assembly="summed"), "--attn_assembly"),
    (dict(router_init="dense"), "--router_init"),
    (dict(router_temperature=0.0), "--router_temperature"),
    (dict(chunks=0), "--chunks"),
    (dict(bottom_layers=-1), "--bottom_layers"),
])
def test_bad_settings_raise_errors_naming_the_flag(settings, flag):
    with pytest.raises(ValueError, match=flag):
        MoMConfig(**settings)


@pytest.mark.parametrize("settings, flag", [
    (dict(modules_per_step=CFG["n_layer"] + 2), "--modules_per_step"),
    (dict(bottom_layers=2, top_layers=1), "--chunks"),  # no routed layer left
    (dict(chunks=2), "--chunks"),  # 3 layers cannot hold 2 chunks and their 2 anchors
])
def test_settings_impossible_for_the_model_size_raise_errors_naming_the_flag(settings, flag):
    with pytest.raises(ValueError, match=flag):
        MoMGPT(GPTConfig(**CFG), MoMConfig(**settings))


def test_from_dense_refuses_a_pool_larger_than_the_layers_that_can_fill_it():
    with pytest.raises(ValueError, match="--n_attn_modules"):
        MoMGPT.from_dense(tiny_dense(), MoMConfig(n_attn_modules=4))


def test_runs_under_bfloat16_autocast():
    # autocast lowers the matmuls but not the residual stream: the dispatch buffers must follow
    mom = tiny_mom(modules_per_step=2, skip_bias=1.0)
    idx = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss, aux = mom.train()(idx, idx)
        (loss + aux["mom_balance"]).backward()
        out = mom.eval().generate(idx[:, :4], 4, temperature=0)
    assert torch.isfinite(loss) and out.shape == (2, 8)
