"""The Triton kernels of `bitnet_training.quant.triton_kernels`, which imports this module on
first use (importing Triton is not free, and it exists only where PyTorch has CUDA)."""

import triton
import triton.language as tl


@triton.jit
def bf16_bits(y):
    """float32 -> bfloat16's bits (int16), rounded to nearest even; NaN -> 0x7FC0."""
    b = y.to(tl.uint32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    return tl.where(y == y, r, 0x7FC0).to(tl.int16)


@triton.jit
def to_bf16(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(x_ptr + o, mask=o < n, other=0.0)
    tl.store(out_ptr + o, bf16_bits(y), mask=o < n)


@triton.jit
def act_quant(
    x_ptr,
    codes_ptr,
    inv_ptr,
    xq_ptr,
    k,
    qp,
    eps,
    WRITE_CODES: tl.constexpr,
    WRITE_XQ: tl.constexpr,
    XQ_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * k
    offs = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, k, BLOCK):
        o = start + offs
        v = tl.load(x_row + o, mask=o < k, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
        nan = nan | (v != v).to(tl.int32)
    m = tl.max(amax, axis=0)
    m = tl.where(m < eps, eps, m)
    m = tl.where(tl.max(nan, axis=0) > 0, float("nan"), m)  # amax and clamp keep a NaN
    s = tl.math.div_rn(1.0, m) * qp
    tl.store(inv_ptr + row, s)
    for start in range(0, k, BLOCK):
        o = start + offs
        inside = o < k
        t = tl.load(x_row + o, mask=inside, other=0.0).to(tl.float32) * s
        q = (t + 12582912.0) - 12582912.0  # round half to even: |t| <= 128 < 2^22
        # A NaN product's code is 0, as PyTorch's cast gives on CPU and CUDA (LLVM leaves
        # a NaN's conversion undefined).
        q = tl.where(t == t, q, 0.0)
        if WRITE_CODES:
            tl.store(codes_ptr + row * k + o, q.to(tl.int8), mask=inside)
        if WRITE_XQ:
            y = tl.math.div_rn(q, s)
            if XQ_BF16:
                tl.store(xq_ptr + row * k + o, bf16_bits(y), mask=inside)
            else:
                tl.store(xq_ptr + row * k + o, y.to(xq_ptr.dtype.element_ty), mask=inside)
