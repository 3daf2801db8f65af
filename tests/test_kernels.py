"""
Triton kernels (kernels.py) against their PyTorch references, run on the CPU by Triton's
interpreter: forward and backward, fp32 tight and bf16 loose, over the shapes that break
index and mask arithmetic (k = 1, k = T, d not a power of two, batch > 1, odd T).
"""

import pytest
import torch

import kernels

if kernels.TRITON_AVAILABLE:
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(kernels._scatter_weighted_add_fwd, InterpretedFunction):
        raise RuntimeError("these tests need TRITON_INTERPRET=1 set before Triton is imported (tests/conftest.py sets it)")

pytestmark = pytest.mark.skipif(not kernels.TRITON_AVAILABLE, reason="Triton is not installed")


def interpreter_runs_argument_bounded_loops():
    """Triton < 3.7's interpreter turns a kernel argument into a 1-element array that numpy >= 2.4
    refuses to convert to int, so `for i in range(rows_per_program)` fails there (the compiled
    kernel, tests/test_cuda.py, does not go through the interpreter)."""
    import numpy
    import triton

    def version(module):
        return tuple(int(part) for part in module.__version__.split(".")[:2])

    return version(triton) >= (3, 7) or version(numpy) < (2, 4)


# the layernorm backward kernel loops over a number of rows given as an argument
needs_argument_loops = pytest.mark.skipif(
    kernels.TRITON_AVAILABLE and not interpreter_runs_argument_bounded_loops(),
    reason="Triton < 3.7's interpreter cannot run this kernel with numpy >= 2.4: "
           "pip install 'numpy<2.4' (or Triton >= 3.7) to run it")

torch.set_num_threads(1)

# (B, T, k, d): odd T and d (masked columns), k = 1, k = T, batch > 1
SHAPES = [(2, 13, 5, 48), (1, 8, 1, 32), (2, 6, 6, 24), (3, 10, 4, 20)]
TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def routed_positions(B, T, k, seed):
    """Sorted unique positions per row, as expert-choice top-k gives them."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(T, generator=g)[:k].sort().values for _ in range(B)])


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def grads(outputs, inputs, upstream):
    return torch.autograd.grad(outputs, inputs, upstream)


@needs_argument_loops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,k,d", SHAPES)
def test_gather_layernorm_matches_reference_forward_and_backward(B, T, k, d, dtype):
    torch.manual_seed(0)
    x = torch.randn(B, T, d).mul(2).add(0.5).to(dtype)
    weight, bias = (1 + 0.3 * torch.randn(d)).to(dtype), (0.2 * torch.randn(d)).to(dtype)
    idx = routed_positions(B, T, k, seed=1)
    g_sub, g_normed = torch.randn(B, k, d).to(dtype), torch.randn(B, k, d).to(dtype)

    ins = leaves(x, weight, bias)
    sub, normed = kernels.GatherLayerNorm.apply(*ins[:1], idx, *ins[1:], 1e-5)
    got = [sub, normed, *grads((sub, normed), ins, (g_sub, g_normed))]

    # reference in fp32 from the same (possibly bf16) inputs: the kernels compute in fp32 too
    ref_ins = leaves(x.float(), weight.float(), bias.float())
    ref_sub, ref_normed = kernels.gather_layernorm_reference(*ref_ins[:1], idx, *ref_ins[1:], 1e-5)
    want = [ref_sub, ref_normed, *grads((ref_sub, ref_normed), ref_ins, (g_sub.float(), g_normed.float()))]

    assert torch.equal(sub, x.gather(1, idx[..., None].expand(-1, -1, d)))  # the gather is a copy
    for name, a, e in zip(["x_sub", "normed", "dx", "dweight", "dbias"], got, want):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.float(), e, **TOLERANCE[dtype], msg=name)


@needs_argument_loops
def test_layernorm_backward_sums_weight_grads_over_programs_with_several_rows(monkeypatch):
    """On a GPU each backward program walks many rows; with 3 programs for 10 rows the last
    one is partly empty, which the shapes above (one row per program) never exercise.
    Also the LayerNorm without a bias (GPTConfig.bias=False)."""
    monkeypatch.setattr(kernels, "BWD_PROGRAMS", 3)
    torch.manual_seed(0)
    x, weight = torch.randn(2, 11, 20), 1 + 0.3 * torch.randn(20)
    idx = routed_positions(2, 11, 5, seed=5)
    upstream = (torch.randn(2, 5, 20), torch.randn(2, 5, 20))
    ins, ref_ins = leaves(x, weight), leaves(x, weight)
    outs = kernels.GatherLayerNorm.apply(ins[0], idx, ins[1], None, 1e-5)
    ref_outs = kernels.gather_layernorm_reference(ref_ins[0], idx, ref_ins[1], None)
    torch.testing.assert_close(outs, ref_outs, **TOLERANCE[torch.float32])
    got, want = grads(outs, ins, upstream), grads(ref_outs, ref_ins, upstream)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,k,d", SHAPES)
def test_scatter_weighted_add_matches_reference_forward_and_backward(B, T, k, d, dtype):
    torch.manual_seed(0)
    x, update = torch.randn(B, T, d).to(dtype), torch.randn(B, k, d).to(dtype)
    w = torch.rand(B, k).to(dtype)
    idx = routed_positions(B, T, k, seed=2)
    g_out = torch.randn(B, T, d).to(dtype)

    ins = leaves(x, update, w)
    out = kernels.ScatterWeightedAdd.apply(ins[0], idx, ins[1], ins[2])
    got = [out, *grads(out, ins, g_out)]

    ref_ins = leaves(x.float(), update.float(), w.float())
    ref_out = kernels.scatter_weighted_add_reference(ref_ins[0], idx, ref_ins[1], ref_ins[2])
    want = [ref_out, *grads(ref_out, ref_ins, g_out.float())]

    for name, a, e in zip(["out", "dx", "dupdate", "dw"], got, want):
        assert a.dtype == dtype, name
        torch.testing.assert_close(a.float(), e, **TOLERANCE[dtype], msg=name)


def test_scatter_weighted_add_leaves_unrouted_rows_bit_identical():
    torch.manual_seed(0)
    x, update, w = torch.randn(2, 9, 24), torch.randn(2, 3, 24), torch.rand(2, 3)
    idx = routed_positions(2, 9, 3, seed=3)
    out = kernels.ScatterWeightedAdd.apply(x, idx, update, w)
    unrouted = torch.ones(2, 9, dtype=torch.bool).scatter_(1, idx, False)
    assert torch.equal(out[unrouted], x[unrouted])
    assert not torch.equal(out[~unrouted], x[~unrouted])


def test_scatter_weighted_add_keeps_fp32_residual_with_bf16_update():
    """Under autocast the residual stream stays fp32 while the block's update and the router
    weight come out in bf16: the sum must land in fp32 and the gradients in each input's dtype."""
    torch.manual_seed(0)
    x = torch.randn(2, 7, 20)
    update, w = torch.randn(2, 3, 20).bfloat16(), torch.rand(2, 3).bfloat16()
    idx = routed_positions(2, 7, 3, seed=4)
    ins = leaves(x, update, w)
    out = kernels.ScatterWeightedAdd.apply(*ins[:1], idx, *ins[1:])
    dx, dupdate, dw = grads(out, ins, torch.ones_like(x))
    assert (out.dtype, dx.dtype, dupdate.dtype, dw.dtype) == (torch.float32, torch.float32, torch.bfloat16, torch.bfloat16)
    ref = kernels.scatter_weighted_add_reference(x, idx, update.float(), w.float())
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_without_a_gpu_the_model_runs_the_reference():
    x = torch.randn(1, 4, 8)
    assert not kernels.use_triton(x, "triton") and not kernels.use_triton(x, "torch")


@needs_argument_loops
def test_mod_training_step_with_kernels_matches_the_step_without(monkeypatch):
    """One MoD training step (LM loss + router BCE, backward, SGD) with the fused kernels
    against the same step through mod.py's plain PyTorch: same loss, gradients and weights."""
    from model import GPTConfig
    from mod import MoDConfig, MoDGPT

    flags_seen = []

    def on_cpu_too(x, kernels="triton"):  # the interpreter stands in for a GPU
        flags_seen.append(kernels)
        return kernels == "triton"

    monkeypatch.setattr(kernels, "use_triton", on_cpu_too)
    config = GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=24, dropout=0.0, bias=True)
    tokens = torch.randint(40, (2, 16), generator=torch.Generator().manual_seed(0))

    def one_step(flag):
        torch.manual_seed(0)
        model = MoDGPT(config, MoDConfig(capacity=0.25, kernels=flag))
        _, loss, aux = model(tokens, tokens)
        total = loss + sum(model.loss_weights[name] * value for name, value in aux.items())
        total.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        return total.detach(), grads, dict(model.named_parameters())

    loss, grads, params = one_step("triton")
    assert "triton" in flags_seen
    ref_loss, ref_grads, ref_params = one_step("torch")
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert any("router" in name and g.abs().sum() > 0 for name, g in grads.items())
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)
        torch.testing.assert_close(params[name], ref_params[name], atol=1e-6, rtol=1e-5, msg=name)
