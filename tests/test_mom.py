"""Mixture-of-Modules: the properties DESIGN.md lists, on tiny models with fixed seeds."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT, GPTConfig
from mom import SKIP, MoMConfig, MoMGPT
from router import switch_balance_loss

CFG = dict(block_size=16, vocab_size=32, n_layer=3, n_head=2, n_embd=16, dropout=0.0)


def tiny_dense(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**CFG, **overrides})).eval()


def tiny_mom(seed=0, skip_bias=0.0, **vcfg):
    """A random MoM; skip_bias raises the SKIP logit of both routers so SKIP actually happens."""
    torch.manual_seed(seed)
    model = MoMGPT(GPTConfig(**CFG), MoMConfig(**vcfg)).eval()
    with torch.no_grad():
        for router in (model.attn_router, model.ffn_router):
            router.out.weight.mul_(50)  # sharper than at init: choices differ from token to token
            router.out.bias[-1] += skip_bias
    return model


def tokens(B=2, T=16, seed=1):
    return torch.randint(0, CFG["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


class FixedRouter(nn.Module):
    """Stands in for a router: returns the same logits at every step."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits
        self.out = nn.Linear(1, logits.size(-1))  # route() reads the number of choices from here

    def forward(self, x, state=None):
        return self.logits, state


def test_reduces_exactly_to_the_dense_model_when_step_h_is_forced_to_module_h():
    dense = tiny_dense()
    mom = MoMGPT.from_dense(dense, MoMConfig(modules_per_step=1)).eval()
    mom.forced_modules = [(h, h) for h in range(CFG["n_layer"])]
    idx = tokens()
    dense_logits, dense_loss, _ = dense(idx, idx)
    mom_logits, mom_loss, _ = mom(idx, idx)
    torch.testing.assert_close(mom_logits, dense_logits, rtol=0, atol=1e-6)
    assert abs(mom_loss.item() - dense_loss.item()) < 1e-6


def test_forced_skip_leaves_the_hidden_state_unchanged():
    mom = tiny_mom(modules_per_step=1)
    mom.forced_modules = [(SKIP, SKIP)] * mom.vcfg.assembly_steps
    x = torch.randn(2, 16, CFG["n_embd"])
    out, _ = mom.forward_trunk(x)
    assert torch.equal(out, x)


def test_a_module_nobody_chose_is_never_run():
    mom = tiny_mom(modules_per_step=1)
    mom.forced_modules = [(0, 0)] * mom.vcfg.assembly_steps
    calls = []
    for pool in (mom.attn_pool, mom.ffn_pool):
        for module in pool[1:]:
            module.register_forward_hook(lambda *_: calls.append(1))
            for child in module.children():
                child.register_forward_hook(lambda *_: calls.append(1))
    mom(tokens())
    assert calls == []


def hand_attention(mom, x, chosen, probs):
    """Token by token, head by head: the k-th choices of all tokens form assembly k; token i
    attends over the earlier-or-same tokens whose k-th choice is not SKIP."""
    T, C = x.shape
    N, nh = len(mom.attn_pool), CFG["n_head"]
    hs = C // nh
    out = torch.zeros_like(x)
    for k in range(chosen.size(-1)):
        qkv = {}
        for j in range(T):
            m = chosen[j, k].item()
            if m != N:
                module = mom.attn_pool[m]
                qkv[j] = module.attn.c_attn(module.ln_1(x[j]))
        for i in qkv:
            keys = [j for j in qkv if j <= i]
            y = torch.zeros(C)
            for h in range(nh):
                sl = slice(h * hs, (h + 1) * hs)
                q = qkv[i][:C][sl]
                scores = torch.stack([q @ qkv[j][C:2 * C][sl] for j in keys]) / math.sqrt(hs)
                att = scores.softmax(0)
                y[sl] = sum(a * qkv[j][2 * C:][sl] for a, j in zip(att, keys))
            m = chosen[i, k].item()
            out[i] += probs[i, m] * mom.attn_pool[m].attn.c_proj(y)
    return out


def hand_ffn(mom, x, chosen, probs):
    out = torch.zeros_like(x)
    for j in range(x.size(0)):
        for m in chosen[j].tolist():
            if m != len(mom.ffn_pool):
                module = mom.ffn_pool[m]
                out[j] += probs[j, m] * module.mlp(module.ln_2(x[j]))
    return out


def test_k2_assembly_matches_a_hand_computation():
    torch.manual_seed(0)
    mom = MoMGPT(GPTConfig(**CFG), MoMConfig(n_attn_modules=2, n_ffn_modules=2, assembly_steps=1,
                                             modules_per_step=2)).eval()
    T = 6
    # rows = tokens, columns = (module 0, module 1, SKIP); mixes of modules, SKIP first or second
    attn_logits = torch.tensor([[2.0, 1, 0], [0, 2, 1], [1, 0, 2], [0, 1, 3], [3, 0, 1], [1, 3, 2]])
    ffn_logits = torch.tensor([[0.0, 2, 1], [2, 1, 0], [0, 1, 2], [1, 0, 3], [1, 2, 0], [3, 0, 1]])
    mom.attn_router = FixedRouter(attn_logits[None])
    mom.ffn_router = FixedRouter(ffn_logits[None])
    x = torch.randn(1, T, CFG["n_embd"])
    with torch.no_grad():
        out, _ = mom.forward_trunk(x)
        attn_probs, ffn_probs = attn_logits.softmax(-1), ffn_logits.softmax(-1)
        h = x[0] + hand_attention(mom, x[0], attn_probs.topk(2).indices, attn_probs)
        expected = h + hand_ffn(mom, h, ffn_probs.topk(2).indices, ffn_probs)
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "gru"])
def test_routers_get_gradient_from_the_lm_loss_alone_with_k1(kind):
    mom = tiny_mom(modules_per_step=1, router_kind=kind).train()
    idx = tokens()
    _, loss, _ = mom(idx, idx)
    loss.backward()  # the LM loss only: no balance term
    for router in (mom.attn_router, mom.ffn_router):
        grads = [p.grad for p in router.parameters()]
        assert all(g is not None for g in grads)
        # well above round-off: a renormalised K=1 weight p/p still leaks ~1e-10 of gradient
        assert max(g.abs().max().item() for g in grads) > 1e-6


def test_balance_loss_is_one_for_uniform_routing_and_n_for_collapse():
    N, tokens_ = 5, 40
    uniform = torch.full((tokens_, N), 1.0 / N)
    spread = torch.arange(tokens_)[:, None] % N  # every option chosen equally often
    assert abs(switch_balance_loss(uniform, spread, N).item() - 1.0) < 1e-6
    collapsed = F.one_hot(torch.zeros(tokens_, dtype=torch.long), N).float()
    assert abs(switch_balance_loss(collapsed, torch.zeros(tokens_, 1, dtype=torch.long), N).item() - N) < 1e-6


def test_model_balance_loss_counts_skip_as_a_class():
    mom = tiny_mom(modules_per_step=1)  # 3 modules + SKIP per pool
    mom.forced_modules = [(SKIP, SKIP)] * mom.vcfg.assembly_steps  # everyone collapses onto SKIP
    _, _, aux = mom(tokens())
    assert abs(aux["mom_balance"].item() - (CFG["n_layer"] + 1)) < 1e-6
    assert mom.loss_weights == {"mom_balance": 0.01}


@pytest.mark.parametrize("kind", ["mlp", "gru"])
def test_permuting_modules_together_with_router_outputs_changes_nothing(kind):
    mom = tiny_mom(modules_per_step=2, router_kind=kind, skip_bias=1.0)
    idx = tokens()
    before, _, _ = mom(idx, idx)
    perm = [2, 0, 1]
    with torch.no_grad():
        for pool, router in ((mom.attn_pool, mom.attn_router), (mom.ffn_pool, mom.ffn_router)):
            rows = perm + [len(pool)]  # SKIP stays last
            router.out.weight.copy_(router.out.weight[rows])
            router.out.bias.copy_(router.out.bias[rows])
            modules = list(pool)
            for i, p in enumerate(perm):
                pool[i] = modules[p]
    after, _, _ = mom(idx, idx)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("K", [1, 2])
def test_cached_decoding_matches_the_full_forward(K):
    mom = tiny_mom(modules_per_step=K, skip_bias=1.0)
    idx = tokens(T=16)
    full, _, _ = mom(idx, idx)  # logits at every position
    cache = mom.new_cache()
    logits, _, _ = mom(idx[:, :5], cache=cache)  # prefill
    steps = [logits[:, -1]]
    for t in range(5, 16):
        logits, _, _ = mom(idx[:, t:t + 1], cache=cache, pos_offset=t)
        steps.append(logits[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 4:], rtol=1e-5, atol=1e-5)
    # the routing saw SKIPs, and a SKIP wrote nothing: the cache holds exactly the non-SKIP choices
    mom(idx)  # the full forward routes every token as the cached run did, one token at a time
    routing = mom.last_routing["attn"]
    kept = (routing != len(mom.attn_pool)).sum().item()
    assert 0 < kept < routing.numel()
    assert sum(len(c) for c in cache) == kept


def test_cached_greedy_generation_equals_recomputation():
    mom = tiny_mom(modules_per_step=1, skip_bias=1.0)
    prompt = tokens(T=4)
    cached = mom.generate(prompt, 10, temperature=0, use_cache=True)
    recomputed = mom.generate(prompt, 10, temperature=0, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_changing_future_tokens_never_changes_earlier_logits():
    mom = tiny_mom(modules_per_step=2, skip_bias=1.0)
    a = tokens()
    b = a.clone()
    b[:, 10:] = (b[:, 10:] + 1) % CFG["vocab_size"]
    la, _, _ = mom(a, a)
    lb, _, _ = mom(b, b)
    torch.testing.assert_close(la[:, :10], lb[:, :10], rtol=0, atol=1e-6)


def test_evaluate_reports_routing_and_flops_from_the_actual_routing():
    mom = tiny_mom(modules_per_step=1)
    idx = tokens()
    mom.forced_modules = [(h, h) for h in range(CFG["n_layer"])]
    dense_like = mom.evaluate(idx, idx)
    assert dense_like["skip_rate"] == 0 and dense_like["modules_per_step"] == 1
    assert dense_like["flops_per_token"] == mom.flops_per_token(seq_len=idx.size(1))
    mom.forced_modules = [(SKIP, SKIP)] * CFG["n_layer"]
    skipped = mom.evaluate(idx, idx)
    assert skipped["skip_rate"] == 1 and skipped["modules_per_step"] == 0
    # only the routers and the head remain
    routers = 6 * CFG["n_layer"] * (mom.attn_router.matmul_params() + mom.ffn_router.matmul_params())
    assert skipped["flops_per_token"] == routers + 6 * CFG["n_embd"] * CFG["vocab_size"]


def test_ceiling_flops_equal_the_dense_model_plus_routers_when_h_equals_l():
    mom = tiny_mom(modules_per_step=1)
    dense = tiny_dense()
    routers = 6 * CFG["n_layer"] * (mom.attn_router.matmul_params() + mom.ffn_router.matmul_params())
    assert mom.flops_per_token() == dense.flops_per_token() + routers


@pytest.mark.parametrize("settings, flag", [
    (dict(modules_per_step=5, n_attn_modules=3), "--modules_per_step"),
    (dict(modules_per_step=0), "--modules_per_step"),
    (dict(router_kind="lstm"), "--router_kind"),
    (dict(balance_coef=-1.0), "--balance_coef"),
    (dict(assembly_steps=-2), "--assembly_steps"),
])
def test_bad_settings_raise_errors_naming_the_flag(settings, flag):
    with pytest.raises(ValueError, match=flag):
        MoMConfig(**settings)


def test_k_larger_than_the_default_pool_is_caught_once_the_pool_size_is_known():
    with pytest.raises(ValueError, match="--modules_per_step"):
        MoMGPT(GPTConfig(**CFG), MoMConfig(modules_per_step=CFG["n_layer"] + 2))


def test_from_dense_rejects_a_pool_size_other_than_the_dense_depth():
    with pytest.raises(ValueError, match="--n_attn_modules"):
        MoMGPT.from_dense(tiny_dense(), MoMConfig(n_attn_modules=2))


def test_runs_under_bfloat16_autocast():
    # autocast lowers the matmuls but not the residual stream: the dispatch buffers must follow
    mom = tiny_mom(modules_per_step=2, skip_bias=1.0)
    idx = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss, aux = mom.train()(idx, idx)
        (loss + aux["mom_balance"]).backward()
        out = mom.eval().generate(idx[:, :4], 4, temperature=0)
    assert torch.isfinite(loss) and out.shape == (2, 8)
