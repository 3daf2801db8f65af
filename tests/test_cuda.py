"""
On a CUDA GPU (skipped elsewhere): the Triton kernels compiled for real, every variant's
training step under bf16 autocast (eager and torch.compile) against an fp32 eager step, cached
decoding against recomputation, and MoD with --kernels triton against --kernels torch over a
few optimizer steps. gpu_suite.py runs this file first; by hand:

    TRITON_INTERPRET=0 python -m pytest -q tests/test_cuda.py

(tests/conftest.py turns Triton's interpreter on for the CPU tests of kernels.py; the kernel
and compile tests here skip when it is on, since they are about the real compiler.)
"""

import os
import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import kernels  # noqa: E402  (after the skip: nothing below runs without a GPU)
from model import GPT, GPTConfig  # noqa: E402

from variants import VARIANTS  # noqa: E402

DEVICE = "cuda"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
real_triton = pytest.mark.skipif(
    not kernels.TRITON_AVAILABLE or INTERPRETED,
    reason="needs Triton compiling for the GPU: run with TRITON_INTERPRET=0",
)
compiled_ok = pytest.mark.skipif(
    INTERPRETED, reason="inductor's Triton kernels under TRITON_INTERPRET=1"
)

CONFIG = dict(block_size=64, vocab_size=512, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
# (name, settings overrides): every variant of the registry, and MoD once more with the kernels
CASES = [(name, {}) for name in VARIANTS] + [("mod", {"kernels": "triton"})]
# MoM at H = L/2, as gpu_suite.py measures it
OVERRIDES = {"mom": {"assembly_steps": CONFIG["n_layer"] // 2}}


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 means fp32 here: TF32 matmuls (10-bit mantissa) would blur the references."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield


def case_id(case):
    name, extra = case
    return name + "".join(f"-{v}" for v in extra.values())


def build(name, extra=None, seed=0, **config):
    """A variant at CONFIG's dims on the GPU, from a fresh dense GPT where it needs one."""
    torch.manual_seed(seed)
    cls, settings_cls = VARIANTS[name]
    settings = (
        settings_cls(**{**OVERRIDES.get(name, {}), **(extra or {})}) if settings_cls else None
    )
    gpt_config = GPTConfig(**{**CONFIG, **config})
    model = (
        cls.from_dense(GPT(gpt_config), settings)
        if cls.starts_from_dense
        else cls(gpt_config, settings)
    )
    return model.to(DEVICE)


def batch(seed, B=4, T=CONFIG["block_size"], vocab=CONFIG["vocab_size"]):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(vocab, (B, T), generator=g).to(DEVICE),
        torch.randint(vocab, (B, T), generator=g).to(DEVICE),
    )


# --- kernels.py, compiled by Triton --------------------------------------------------------

# (B, T, k, d): odd T, k and d; k = T; k = 1 with a d past 512 (a 1024-wide block, 4 warps);
# GPT-2 124M dims at C = 0.125 with B = 8 (1,024 routed rows: the LayerNorm backward walks
# two rows per program, BWD_PROGRAMS = 512)
SHAPES = [(3, 37, 11, 40), (1, 9, 9, 50), (4, 100, 1, 1000), (8, 1024, 128, 768)]
# fp32: both sides compute in fp32, only the order of the sums differs (a few ulps on values
# near 1; dweight sums 1,024 rows). bf16: the kernels round each output once to bf16's 8-bit
# mantissa (up to 0.4% relative) where the reference stays in fp32; 3e-2 also covers
# elements near 0, where the absolute part decides.
TOLERANCE = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def routed_positions(B, T, k, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(T, generator=g)[:k].sort().values for _ in range(B)]).to(
        DEVICE
    )


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@real_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,T,k,d", SHAPES)
def test_compiled_gather_layernorm_matches_its_reference(B, T, k, d, dtype):
    torch.manual_seed(0)
    x = torch.randn(B, T, d, device=DEVICE).mul(2).add(0.5).to(dtype)
    weight = (1 + 0.3 * torch.randn(d, device=DEVICE)).to(dtype)
    bias = (0.2 * torch.randn(d, device=DEVICE)).to(dtype)
    idx = routed_positions(B, T, k, seed=1)
    upstream = (
        torch.randn(B, k, d, device=DEVICE).to(dtype),
        torch.randn(B, k, d, device=DEVICE).to(dtype),
    )
    assert kernels.use_triton(x, "triton")
    ins = leaves(x, weight, bias)
    outs = kernels.gather_layernorm(ins[0], idx, ins[1], ins[2], kernels="triton")
    got = [*outs, *torch.autograd.grad(outs, ins, upstream)]
    ref_ins = leaves(x.float(), weight.float(), bias.float())  # the kernels compute in fp32 too
    ref_outs = kernels.gather_layernorm_reference(ref_ins[0], idx, ref_ins[1], ref_ins[2])
    want = [*ref_outs, *torch.autograd.grad(ref_outs, ref_ins, [u.float() for u in upstream])]
    assert torch.equal(
        outs[0], x.gather(1, idx[..., None].expand(-1, -1, d))
    )  # the gather is a copy
    for name, a, e in zip(["x_sub", "normed", "dx", "dweight", "dbias"], got, want):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.float(), e, **TOLERANCE[dtype], msg=name)


@real_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,T,k,d", SHAPES)
def test_compiled_scatter_weighted_add_matches_its_reference(B, T, k, d, dtype):
    torch.manual_seed(0)
    x, update = torch.randn(B, T, d, device=DEVICE).to(dtype), torch.randn(
        B, k, d, device=DEVICE
    ).to(dtype)
    w = torch.rand(B, k, device=DEVICE).to(dtype)
    idx = routed_positions(B, T, k, seed=2)
    upstream = torch.randn(B, T, d, device=DEVICE).to(dtype)
    ins = leaves(x, update, w)
    out = kernels.scatter_weighted_add(ins[0], idx, ins[1], ins[2], kernels="triton")
    got = [out, *torch.autograd.grad(out, ins, upstream)]
    ref_ins = leaves(x.float(), update.float(), w.float())
    ref_out = kernels.scatter_weighted_add_reference(ref_ins[0], idx, ref_ins[1], ref_ins[2])
    want = [ref_out, *torch.autograd.grad(ref_out, ref_ins, upstream.float())]
    routed = torch.zeros(B, T, dtype=torch.bool, device=DEVICE).scatter_(1, idx, True)
    assert torch.equal(out[~routed], x[~routed])  # unrouted rows are a copy, bit for bit
    for name, a, e in zip(["out", "dx", "dupdate", "dw"], got, want):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.float(), e, **TOLERANCE[dtype], msg=name)


# --- every variant's training step: bf16 autocast (eager, compiled) against fp32 eager -------


def loss_and_grads(model, step_model, x, y, autocast):
    """The training loss (LM + weighted aux) and the gradient of every trained weight, fp32."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        _, loss, aux = step_model(x, y)
        loss = loss + sum(model.loss_weights[k] * v for k, v in aux.items())
    loss.backward()
    grads = {
        n: p.grad.detach().float().clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    return loss.detach().float(), grads


def relative_error(got, want):
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def assert_close_to_fp32(got, want):
    """bf16 autocast against fp32. The loss within 1%: bf16 matmul inputs keep 8 mantissa bits
    (0.2-0.4% relative each), errors that mostly cancel in a mean over B T tokens (measured on
    a CPU: under 0.05%). Gradients as one vector within 20%: a routing decision read from a
    bf16 score near its boundary (a top-k token, a module choice) flips, and MoM's router
    gradients are differences of near-equal terms (measured on a CPU: 0.6% for GPT-2, 0.5-4%
    for MoD, 10-12% for MoM). Each weight's gradient nearer the fp32 one than zero is (relative
    error < 0.9; MoM's GRU routers reach 0.76): a missing gradient gives 1, a flipped sign 2."""
    (loss, grads), (ref_loss, ref_grads) = got, want
    assert grads.keys() == ref_grads.keys()
    assert abs(loss - ref_loss).item() <= 1e-2 * abs(ref_loss).item()
    flat = torch.cat([g.flatten() for g in grads.values()])
    ref_flat = torch.cat([g.flatten() for g in ref_grads.values()])
    assert relative_error(flat, ref_flat) < 0.2
    worst = max(grads, key=lambda n: relative_error(grads[n], ref_grads[n]))
    assert relative_error(grads[worst], ref_grads[worst]) < 0.9, worst


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bf16_eager_training_step_matches_fp32(case):
    model = build(*case)
    x, y = batch(seed=1)
    assert_close_to_fp32(
        loss_and_grads(model, model, x, y, True), loss_and_grads(model, model, x, y, False)
    )


# --- cached decoding ----------------------------------------------------------------------


def decisive(model, std=0.3):
    """Every matrix redrawn at a large scale: routers then decide far from their thresholds
    (MoD routes some tokens, MindSkip closes some gates) and greedy decoding meets no near-ties
    that float rounding could flip."""
    g = torch.Generator(device=DEVICE).manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g, device=DEVICE) * std)
    return model.eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_decoding_on_cuda_equals_recomputation(name):
    model = decisive(build(name, seed=2))
    prompt = batch(seed=4, B=3, T=5)[0]
    cached = model.generate(prompt, 40, temperature=0, use_cache=True)
    recomputed = model.generate(prompt, 40, temperature=0, use_cache=False)
    assert cached.shape == (3, 45)
    assert torch.equal(cached, recomputed)


# --- MoD: the Triton kernels against plain PyTorch over a few optimizer steps ---------------


def train_steps(model, steps, autocast):
    """Losses of `steps` AdamW steps on fixed random batches."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        x, y = batch(seed=10 + step)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            _, loss, aux = model(x, y)
            loss = loss + sum(model.loss_weights[k] * v for k, v in aux.items())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return torch.tensor(losses)


@real_triton
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
def test_mod_with_triton_kernels_trains_as_with_plain_pytorch(autocast, monkeypatch):
    """The kernels change the order of a few fp32 sums, no more: fp32 losses agree to 1e-4 over
    five steps (top-k picks the same tokens); under bf16 autocast a rounding that lands the
    other way in a bf16 matmul input moves a loss by about 1e-3, hence 1e-2."""
    fused = build("mod", {"kernels": "triton"}, seed=5)
    plain = build("mod", {"kernels": "torch"}, seed=5)
    fused_calls = []
    gather_layernorm = kernels.gather_layernorm

    def recorded(x, *args, **kwargs):  # mod.py calls this only on its Triton path
        fused_calls.append(kernels.use_triton(x, "triton"))
        return gather_layernorm(x, *args, **kwargs)

    monkeypatch.setattr(kernels, "gather_layernorm", recorded)
    got = train_steps(fused, 5, autocast)
    monkeypatch.undo()
    want = train_steps(plain, 5, autocast)
    assert fused_calls and all(fused_calls), "the Triton path never ran"
    torch.testing.assert_close(got, want, rtol=1e-2 if autocast else 1e-4, atol=0)


# --- last, the slowest: each case compiles (gpu_suite.py may stop pytest at its budget) -------


@compiled_ok
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bf16_compiled_training_step_matches_fp32_eager(case):
    torch._dynamo.reset()  # each case compiles afresh, with its own recompile budget
    model = build(*case)
    x, y = batch(seed=1)
    want = loss_and_grads(model, model, x, y, False)
    compiled = torch.compile(model)
    loss_and_grads(model, compiled, x, y, True)  # a second call hits the compiled graphs again
    assert_close_to_fp32(loss_and_grads(model, compiled, x, y, True), want)
