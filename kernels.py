"""
Fused Triton kernels for the routed blocks, each next to the plain PyTorch it replaces.

A routed block (mod.py) spends time outside its matmuls moving rows of the residual stream x
(B, T, d) in and out of the routed sub-sequence, idx (B, k) being the chosen positions:

    x_sub  = x[b, idx]                                      gather_layernorm
    normed = LayerNorm(x_sub)                               (the block's ln_1)
    out    = x;  out[b, idx] = x_sub + w * f(x_sub)         scatter_weighted_add, w = sigmoid(r)

In eager PyTorch each line is several kernels, each reading and writing whole (B, k, d)
intermediates, and the backward adds as many again. Fused, every routed row is read once and
written once per pass, and the gradient of the update weight, dL/dw = sum_d dL/dout * f (w is
sigmoid(r), not the router's weight vector), comes out of the same pass as dL/df.

The kernels run where --kernels triton (opt-in), Triton imports and the tensor is on a
GPU; everywhere else the reference runs, so the model needs no Triton. Indices must be unique
within a row (top-k guarantees it): the backward writes routed rows rather than adding to them.

No third kernel yet: one earns its place only where a GPU profile shows the time, and none
has been taken. The likeliest candidate is the full-size add where autograd sums the two ops'
gradients for x; removing it means one Function around the block's matmuls too.
"""

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except Exception:  # not only ImportError: a broken Triton install must not break CPU use
    triton = None

TRITON_AVAILABLE = triton is not None
# LayerNorm backward: about this many programs fill a GPU; each sums dweight over its own rows
BWD_PROGRAMS = 512


def use_triton(x, kernels="triton"):
    """Whether the fused kernels run for tensor x: --kernels triton, Triton imported, x on a GPU."""
    return kernels == "triton" and TRITON_AVAILABLE and x.is_cuda


# --- references ---------------------------------------------------------------------------


def gather_layernorm_reference(x, idx, weight, bias, eps=1e-5):
    """x (B, T, d), idx (B, k) -> x_sub = x[b, idx] (B, k, d) and LayerNorm(x_sub)."""
    x_sub = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.size(-1)))
    return x_sub, F.layer_norm(x_sub, weight.shape, weight, bias, eps)


def scatter_weighted_add_reference(x, idx, update, w):
    """out = x except out[b, idx] = x[b, idx] + w[..., None] * update; w (B, k), update
    (B, k, d)."""
    index = idx.unsqueeze(-1).expand(-1, -1, x.size(-1))
    return x.scatter_add(1, index, (w.unsqueeze(-1) * update).to(x.dtype))


# --- kernels ------------------------------------------------------------------------------
# One program per routed row (or per group of rows for the LayerNorm backward), the whole row
# of d features in one block; arithmetic in fp32 whatever the storage dtype.

if TRITON_AVAILABLE:

    @triton.jit
    def _gather_layernorm_fwd(x_ptr, idx_ptr, w_ptr, b_ptr, x_sub_ptr, normed_ptr, mean_ptr,
                              rstd_ptr, T, k, D, eps, HAS_BIAS: tl.constexpr,
                              BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # routed row (b, j) of the (B, k) sub-sequence
        src = (row // k * T + tl.load(idx_ptr + row)) * D  # its row in x
        cols = tl.arange(0, BLOCK_D)
        in_row = cols < D  # d need not be a power of two
        x = tl.load(x_ptr + src + cols, mask=in_row, other=0.0)
        xf = x.to(tl.float32)
        mean = tl.sum(xf, axis=0) / D
        centered = tl.where(in_row, xf - mean, 0.0)
        rstd = tl.rsqrt(tl.sum(centered * centered, axis=0) / D + eps)
        y = centered * rstd * tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        if HAS_BIAS:
            y += tl.load(b_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        tl.store(x_sub_ptr + row * D + cols, x, mask=in_row)
        tl.store(normed_ptr + row * D + cols, y.to(normed_ptr.dtype.element_ty), mask=in_row)
        tl.store(mean_ptr + row, mean)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _gather_layernorm_bwd(x_ptr, idx_ptr, w_ptr, mean_ptr, rstd_ptr, g_sub_ptr, g_normed_ptr,
                              dx_ptr, dw_part_ptr, db_part_ptr, n_rows, rows_per_program, T, k, D,
                              BLOCK_D: tl.constexpr):
        # dx = g_sub + rstd * (w*g - mean(w*g) - xhat * mean(w*g * xhat)), written back to row idx;
        # dweight, dbias: each program sums g*xhat, g over its rows; the host sums the programs
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_D)
        in_row = cols < D
        w = tl.load(w_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_D], dtype=tl.float32)
        db = tl.zeros([BLOCK_D], dtype=tl.float32)
        first = pid.to(tl.int64) * rows_per_program
        for i in range(rows_per_program):
            row = first + i
            if row < n_rows:
                src = (row // k * T + tl.load(idx_ptr + row)) * D
                x = tl.load(x_ptr + src + cols, mask=in_row, other=0.0).to(tl.float32)
                rstd = tl.load(rstd_ptr + row)
                xhat = tl.where(in_row, (x - tl.load(mean_ptr + row)) * rstd, 0.0)
                g = tl.load(g_normed_ptr + row * D + cols, mask=in_row, other=0.0).to(tl.float32)
                wg = w * g
                dx = (wg - tl.sum(wg, axis=0) / D - xhat * (tl.sum(wg * xhat, axis=0) / D)) * rstd
                dx += tl.load(g_sub_ptr + row * D + cols, mask=in_row, other=0.0).to(tl.float32)
                tl.store(dx_ptr + src + cols, dx.to(dx_ptr.dtype.element_ty), mask=in_row)
                dw += g * xhat
                db += g
        tl.store(dw_part_ptr + pid * D + cols, dw, mask=in_row)
        tl.store(db_part_ptr + pid * D + cols, db, mask=in_row)

    @triton.jit
    def _scatter_weighted_add_fwd(x_ptr, idx_ptr, update_ptr, w_ptr, out_ptr, T, k, D,
                                  BLOCK_D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        dst = (row // k * T + tl.load(idx_ptr + row)) * D
        cols = tl.arange(0, BLOCK_D)
        in_row = cols < D
        x = tl.load(x_ptr + dst + cols, mask=in_row, other=0.0).to(tl.float32)
        update = tl.load(update_ptr + row * D + cols, mask=in_row, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + row).to(tl.float32)
        tl.store(out_ptr + dst + cols, (x + w * update).to(out_ptr.dtype.element_ty), mask=in_row)

    @triton.jit
    def _scatter_weighted_add_bwd(g_ptr, idx_ptr, update_ptr, w_ptr, d_update_ptr, dw_ptr, T, k, D,
                                  BLOCK_D: tl.constexpr):
        # d update = w * g[b, idx];  d w = sum_d g[b, idx] * update  (dx = g needs no kernel)
        row = tl.program_id(0).to(tl.int64)
        src = (row // k * T + tl.load(idx_ptr + row)) * D
        cols = tl.arange(0, BLOCK_D)
        in_row = cols < D
        g = tl.load(g_ptr + src + cols, mask=in_row, other=0.0).to(tl.float32)
        update = tl.load(update_ptr + row * D + cols, mask=in_row, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + row).to(tl.float32)
        d_update = (w * g).to(d_update_ptr.dtype.element_ty)
        tl.store(d_update_ptr + row * D + cols, d_update, mask=in_row)
        tl.store(dw_ptr + row, tl.sum(g * update, axis=0).to(dw_ptr.dtype.element_ty))


def _launch_shape(x, idx):
    """(B, T, d), k, the power-of-two block that holds a row, and warps for that block."""
    block_d = triton.next_power_of_2(x.size(-1))
    return x.shape, idx.size(1), block_d, 4 if block_d <= 2048 else 8


class GatherLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, weight, bias, eps):
        x, idx = x.contiguous(), idx.contiguous()
        (B, T, D), k, block_d, warps = _launch_shape(x, idx)
        x_sub = x.new_empty(B, k, D)
        normed = torch.empty_like(x_sub)
        mean = x.new_empty(B * k, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        _gather_layernorm_fwd[(B * k,)](
            x, idx, weight, weight if bias is None else bias, x_sub, normed, mean, rstd,
            T, k, D, eps, HAS_BIAS=bias is not None, BLOCK_D=block_d, num_warps=warps,
        )
        ctx.save_for_backward(x, idx, weight, mean, rstd)
        ctx.has_bias = bias is not None
        return x_sub, normed

    @staticmethod
    def backward(ctx, g_sub, g_normed):
        x, idx, weight, mean, rstd = ctx.saved_tensors
        (B, T, D), k, block_d, warps = _launch_shape(x, idx)
        rows_per_program = triton.cdiv(B * k, BWD_PROGRAMS)
        programs = triton.cdiv(B * k, rows_per_program)
        dx = torch.zeros_like(x)  # tokens that were not routed get no gradient from here
        dw_part = x.new_empty(programs, D, dtype=torch.float32)
        db_part = torch.empty_like(dw_part)
        _gather_layernorm_bwd[(programs,)](
            x, idx, weight, mean, rstd, g_sub.contiguous(), g_normed.contiguous(), dx, dw_part,
            db_part, B * k, rows_per_program, T, k, D, BLOCK_D=block_d, num_warps=warps,
        )
        dweight = dw_part.sum(0).to(weight.dtype)
        dbias = db_part.sum(0).to(weight.dtype) if ctx.has_bias else None
        return dx, None, dweight, dbias, None


class ScatterWeightedAdd(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, idx, update, w):
        x, idx, update, w = x.contiguous(), idx.contiguous(), update.contiguous(), w.contiguous()
        (B, T, D), k, block_d, warps = _launch_shape(x, idx)
        out = x.clone()  # unrouted rows: a plain copy, bit for bit
        _scatter_weighted_add_fwd[(B * k,)](x, idx, update, w, out, T, k, D, BLOCK_D=block_d,
                                            num_warps=warps)
        ctx.save_for_backward(idx, update, w)
        return out

    @staticmethod
    def backward(ctx, g):
        idx, update, w = ctx.saved_tensors
        g = g.contiguous()
        (B, T, D), k, block_d, warps = _launch_shape(g, idx)
        d_update = torch.empty_like(update)
        dw = torch.empty_like(w)
        _scatter_weighted_add_bwd[(B * k,)](g, idx, update, w, d_update, dw, T, k, D,
                                            BLOCK_D=block_d, num_warps=warps)
        return g, None, d_update, dw  # out = x + (rows that do not depend on x): dx = g


# --- what the model calls -----------------------------------------------------------------


def gather_layernorm(x, idx, weight, bias, eps=1e-5, kernels="triton"):
    """x (B, T, d), idx (B, k) unique per row -> (x[b, idx], LayerNorm(x[b, idx])), (B, k, d)."""
    if use_triton(x, kernels):
        return GatherLayerNorm.apply(x, idx, weight, bias, eps)
    return gather_layernorm_reference(x, idx, weight, bias, eps)


def scatter_weighted_add(x, idx, update, w, kernels="triton"):
    """x with rows idx replaced by x[b, idx] + w[..., None] * update; gradients for x, update, w."""
    if use_triton(x, kernels):
        return ScatterWeightedAdd.apply(x, idx, update, w)
    return scatter_weighted_add_reference(x, idx, update, w)
