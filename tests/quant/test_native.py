"""The native (C) quantizer kernels against the PyTorch composition they replace: the same
codes, scales and values, bit for bit."""

import os
import subprocess
import sys
import time

import pytest
import torch

from bitnet_training import QATConfig
from bitnet_training.errors import ConfigError
from bitnet_training.quant import native
from bitnet_training.quant.functional import absmean_scale, dequantize, ternary_quantize, wide

needs_native = pytest.mark.skipif(
    native.library() is None, reason=f"native kernels unavailable: {native.build_error()}"
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def torch_activation_quant(x, bits):
    """The eager form (bitnet_training.nn.bitlinear's fallback): inv = qp / absmax."""
    xf = wide(x)
    inv = (2 ** (bits - 1) - 1) / xf.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-5)
    return (xf * inv).round_().to(torch.int8), inv


def hard_inputs(dtype, rows=67, cols=131, seed=0):
    """Random rows of mixed scale, exact ties (k + 1/2 after scaling), zeros, tiny rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 10
    x[1] = 0
    x[2] = 1e-7
    x[3] = torch.randint(-254, 255, (cols,), generator=g) / 2  # halves: ties for round()
    x[3, 0] = 127  # absmax 127: scale 1, so every half is an exact tie
    x[4, 5] = -1e4  # one outlier
    return x.to(dtype)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [8, 4])
def test_activation_codes_and_scales_equal_the_torch_form(dtype, bits):
    for seed in range(4):
        x = hard_inputs(dtype, seed=seed)
        codes, inv = native.quantize_activations(x, bits)
        want_codes, want_inv = torch_activation_quant(x, bits)
        assert codes.dtype == torch.int8 and inv.dtype == want_inv.dtype
        assert torch.equal(codes, want_codes)
        assert torch.equal(inv, want_inv)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_row_absmax_is_found_wherever_it_sits(dtype):
    """The scale's max |x| (float32 rows compare |x|'s bit patterns 32 and 16 at a time, then
    a scalar tail) for every row length 1..70 and every position of the largest magnitude,
    positive or negative, and of a NaN or an infinity; -0.0 and subnormal rows too."""
    # NaNs of the smallest payload (bit patterns just above infinity's), of either sign.
    low_nans = torch.tensor([0x7F800001, -0x007FFFFF], dtype=torch.int32).view(torch.float32)
    for k in range(1, 71):
        rows = []
        for pos in range(k):
            for big in (3.5, -3.5, float("nan"), *low_nans, float("inf"), -float("inf")):
                row = torch.linspace(-1, 1, k) * 0.5
                row[pos] = big
                rows.append(row)
        rows += [torch.full((k,), -0.0), torch.full((k,), 1e-40), torch.full((k,), -2e-39)]
        x = torch.stack(rows).to(dtype)
        codes, inv = native.quantize_activations(x, 8)
        want_codes, want_inv = torch_activation_quant(x, 8)
        torch.testing.assert_close(inv, want_inv, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(codes, want_codes), k


@needs_native
def test_activation_quantizer_takes_non_contiguous_input_and_many_threads():
    x = hard_inputs(torch.float32, rows=600, cols=256).t()  # 256 x 600, transposed view
    codes, inv = native.quantize_activations(x, 8)
    want_codes, want_inv = torch_activation_quant(x, 8)
    assert torch.equal(codes, want_codes) and torch.equal(inv, want_inv)


@needs_native
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ternary_codes_and_dequantized_weight_equal_the_torch_form(granularity, dtype):
    for seed in range(3):
        w = hard_inputs(torch.float32, rows=48, cols=80, seed=seed) * 0.02
        w[7, :5] = torch.tensor([0.5, -0.5, 1.5, -1.5, 0.49999997]) * w.abs().mean()
        q, dq = native.ternary_quantize(w, granularity, dtype)
        want = ternary_quantize(w, granularity)
        assert torch.equal(q.codes, want.codes)
        assert torch.equal(q.scale, want.scale)
        assert dq.dtype == dtype
        assert torch.equal(dq, dequantize(want, torch.float32).to(dtype))


def wide_range_weight(shape, seed=0):
    """Magnitudes over ~10 decades: float32 sums of these depend on the order of addition."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 3)


@needs_native
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_a_checked_shape_quantizes_gamma_and_codes_in_one_call(granularity, monkeypatch):
    """Once the C sum is checked for a shape, gamma and the codes come from one C call, with
    the same bits (a shape over the parallel sum's grain, with both threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = wide_range_weight((256, 300), seed=3)
        native.ternary_quantize(w, granularity, torch.bfloat16)  # checks the C sum
        if not native._ABSMEAN_CHECKED[(256, 300), granularity == "channel", 2]:
            pytest.skip("this PyTorch sums in another order: the C sum is not used")
        monkeypatch.setattr(native, "absmean", None)  # the one-call path does not need it
        for seed in range(2):
            w = wide_range_weight((256, 300), seed=seed)
            q, dq = native.ternary_quantize(w, granularity, torch.bfloat16)
            want = ternary_quantize(w, granularity)
            assert torch.equal(q.codes, want.codes)
            assert torch.equal(q.scale.view(torch.int32), want.scale.view(torch.int32))
            assert torch.equal(dq, dequantize(want, torch.float32).to(torch.bfloat16))
    finally:
        torch.set_num_threads(before)


# Sizes around the 8-lane vector, the 32-element cascade group and the 32768-element split.
ABSMEAN_SHAPES = [(1, 16), (3, 7), (2, 8), (33, 1000), (128, 384), (1024, 384), (384, 1024)]
ABSMEAN_SHAPES += [(1, 32768), (1, 40000), (5, 32768), (2, 16385), (3, 100003), (4096, 16)]


@needs_native
@pytest.mark.parametrize("threads", [1, 2, 3, 8, 16])
def test_absmean_kernel_equals_torch_mean_bit_for_bit(threads):
    """gamma in one pass equals `w.abs().mean()` (and its per-row form) bit for bit: the same
    cascade summation, the same split of a whole-tensor sum between threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    order_mattered = False
    try:
        for i, shape in enumerate(ABSMEAN_SHAPES):
            w = wide_range_weight(shape, seed=i)
            for per_row in (False, True):
                want = absmean_scale(w, "channel" if per_row else "tensor")
                got = native.absmean_kernel(w, per_row, threads)
                if got is None:  # rows of fewer than 8: left to PyTorch
                    assert per_row and shape[1] < 8
                    continue
                assert got.shape == want.shape
                assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (shape, per_row)
                naive = (w.abs().double().sum() / w.numel()).float()
                order_mattered |= not per_row and not torch.equal(naive, want)
    finally:
        torch.set_num_threads(before)
    assert order_mattered  # the data can tell summation orders apart


@needs_native
def test_absmean_kernel_past_float32_exact_counts():
    w = wide_range_weight((4097, 4097))  # 16785409 elements: the count rounds in float32
    assert torch.equal(native.absmean_kernel(w, False, torch.get_num_threads()), w.abs().mean())


@needs_native
def test_absmean_kernel_follows_the_team_openmp_gives(tmp_path):
    """Under OMP_THREAD_LIMIT PyTorch splits a sum between fewer threads than it reports;
    the kernel splits it the same way (a fresh process: the limit is read at start)."""
    script = tmp_path / "limit.py"
    script.write_text(
        "import torch\n"
        "from bitnet_training.quant import native\n"
        "torch.set_num_threads(8)\n"
        "w = native._order_probe((256, 1536))\n"
        "got = native.absmean_kernel(w, False, torch.get_num_threads())\n"
        "assert torch.equal(got.view(torch.int32), w.abs().mean().view(torch.int32))\n"
    )
    env = {**os.environ, "OMP_THREAD_LIMIT": "2"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_order_probe_tells_thread_splits_apart():
    before = torch.get_num_threads()
    try:
        sums = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            sums.append(native._order_probe((256, 1536)).abs().mean())
    finally:
        torch.set_num_threads(before)
    assert not torch.equal(sums[0], sums[1])


@needs_native
def test_absmean_takes_only_float32_matrices_natively():
    for w in (torch.randn(64, 64, dtype=torch.float64), torch.randn(64, 64).bfloat16()):
        assert torch.equal(native.absmean(w, "tensor"), absmean_scale(w, "tensor"))
        with pytest.raises(ValueError, match="contiguous 2-D float32"):
            native.absmean_kernel(w, False, 1)
    w = torch.randn(4, 8, 8)  # 3-D: PyTorch's
    assert torch.equal(native.absmean(w, "tensor"), w.abs().mean())


@needs_native
def test_absmean_catches_a_kernel_that_agrees_on_the_weight_but_sums_in_another_order(
    monkeypatch,
):
    monkeypatch.setattr(native, "_ABSMEAN_CHECKED", {})

    def one_thread_order(w, per_row, threads):  # PyTorch's sum, split as for one thread
        torch.set_num_threads(1)
        try:
            return w.abs().mean()
        finally:
            torch.set_num_threads(threads)

    monkeypatch.setattr(native, "absmean_kernel", one_thread_order)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        w = torch.full((256, 1536), 0.25)  # every order sums it exactly: the check passes
        assert torch.equal(native.absmean(w, "tensor"), w.abs().mean())
        assert native._ABSMEAN_CHECKED[(256, 1536), False, 2] is False  # the probe did not
    finally:
        torch.set_num_threads(before)


@needs_native
def test_absmean_checks_the_kernel_once_per_shape_and_keeps_torch_where_it_differs(monkeypatch):
    monkeypatch.setattr(native, "_ABSMEAN_CHECKED", {})
    calls = []
    real_kernel = native.absmean_kernel

    def spy(w, per_row, threads):
        calls.append(tuple(w.shape))
        return real_kernel(w, per_row, threads)

    monkeypatch.setattr(native, "absmean_kernel", spy)
    w = wide_range_weight((64, 96))
    want = w.abs().mean()
    for _ in range(3):
        assert torch.equal(native.absmean(w, "tensor"), want)
    assert calls == [(64, 96)] * 5  # the first call also ran the two order probes
    assert native._ABSMEAN_CHECKED[(64, 96), False, torch.get_num_threads()] is True
    calls.clear()
    assert torch.equal(native.absmean(w.t(), "tensor"), w.t().abs().mean())
    assert calls == []  # not contiguous: PyTorch's own

    # A kernel that disagrees with this PyTorch (one whose sum kernel changed): PyTorch's
    # values on the first call, and from then on for that shape.
    monkeypatch.setattr(native, "absmean_kernel", lambda w, per_row, threads: want + 1)
    v = wide_range_weight((32, 40))
    for _ in range(2):
        assert torch.equal(native.absmean(v, "tensor"), v.abs().mean())
    assert native._ABSMEAN_CHECKED[(32, 40), False, torch.get_num_threads()] is False


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rebuilt_activations_equal_torch_div(dtype):
    x = hard_inputs(torch.float64 if dtype == torch.float64 else torch.float32, seed=5)
    codes, inv = torch_activation_quant(x, 8)
    want = codes.div(inv).to(dtype)  # the quotient in the scale's precision, rounded once
    assert torch.equal(native.rebuild_activations(codes, inv, dtype), want)
    out = torch.empty(codes.shape, dtype=dtype)
    assert native.rebuild_activations(codes, inv, dtype, out) is out
    assert torch.equal(out, want)
    with pytest.raises(ValueError, match="no kernel for torch.bfloat16 scales"):
        native.rebuild_activations(codes, inv.bfloat16(), dtype)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_code_over_scales_of_every_magnitude_rebuilds_bit_for_bit(dtype):
    """All codes (a vectorized body and a scalar tail per row) at 4096 scales from 1e-36 to
    1e7 with random significands, at significands of all ones and powers of two, at the
    edges of the division-free quotient's range (2^-100, 2^100 and their neighbours) and
    negated: x_q = dt(code / s) bit for bit, the vectorized bf16 conversion included."""
    g = torch.Generator().manual_seed(3)
    s = torch.exp(torch.empty(4096).uniform_(-82.0, 16.0, generator=g))  # 1e-36 .. 1e7
    s[:64] = torch.ldexp(torch.ones(64), torch.arange(-60, 4, dtype=torch.int32))
    s[64:128] = s[64:128].view(torch.int32).bitwise_or(0x7FFFFF).view(torch.float32)
    edges = torch.tensor([2.0**-100, 2.0**100, 1.5 * 2.0**-100, 1.5 * 2.0**99])
    edges = torch.cat([edges, edges.nextafter(edges * 2), edges.nextafter(edges / 2)])
    s[128:140] = edges
    s[140:200] = -s[:60]
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    for low in (-127, -128):  # 255 codes a row (15 * 16 + 15), and all 256 (16 * 16)
        codes = torch.arange(low, 128, dtype=torch.int8).repeat(4096, 1)
        want = codes.div(s[:, None]).to(dtype)
        got = native.rebuild_activations(codes, s[:, None].contiguous(), dtype)
        assert torch.equal(got.view(bits), want.view(bits))


@needs_native
def test_the_division_free_quotient_equals_the_division_everywhere_it_is_used():
    """x_q's kernels take code / s as Markstein's fused-multiply-add correction of code * (1/s);
    the library's own exhaustive check (every code, every float32 scale in +-[1, 2)) finds
    no difference. (A plain code * (1/s) differs in about 10^9 of those cases.)"""
    assert native.quotient_mismatches() == 0


@needs_native
def test_rebuild_with_scales_past_2_to_126_keeps_subnormal_quotients():
    """bf16 x_q's vector conversion reads float32 subnormals as zero: a scale so large that
    code / s is subnormal (never the quantizer's own) takes the exact scalar path."""
    codes = torch.tensor([[1, -2, 3, 4] * 8 + [1]], dtype=torch.int8)  # 33: vector + tail
    for scale in (1e38, -1e38, 2.0**126, 3.4e38):
        s = torch.tensor([[scale]])
        got = native.rebuild_activations(codes, s, torch.bfloat16)
        assert torch.equal(got.view(torch.int16), codes.div(s).to(torch.bfloat16).view(torch.int16))


@needs_native
def test_the_integer_sums_are_rescaled_in_place_as_torch_rescales_them():
    g = torch.Generator().manual_seed(4)
    acc = torch.randint(-(2**24), 2**24, (300, 77), generator=g, dtype=torch.int32)
    acc[0, :3] = torch.tensor([2**31 - 1, -(2**31), 2**24 + 1])  # rounds to float32
    inv = torch.rand(300, 1, generator=g) * 100 + 1e-3
    gamma, gamma_col = torch.tensor(0.0123), torch.rand(1, 77, generator=g)
    for scale, want in (
        (gamma, acc.float().mul_(gamma / inv)),
        (gamma_col, acc.float().div_(inv).mul_(gamma_col)),
    ):
        buf = acc.clone()
        got = native.rescale_accumulator(buf, inv, scale)
        assert got.data_ptr() == buf.data_ptr() and got.dtype == torch.float32  # in place
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    with pytest.raises(ValueError, match="int32"):
        native.rescale_accumulator(acc.float(), inv, gamma)
    with pytest.raises(ValueError, match="one per row"):
        native.rescale_accumulator(acc.clone(), inv[:5], gamma)


@needs_native
def test_rebuild_refuses_a_scale_count_that_is_not_one_per_row():
    codes = torch.ones(4, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="one scale per row"):
        native.rebuild_activations(codes, torch.ones(1, 1), torch.float32)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("to", DTYPES, ids=str)
def test_the_quantizer_pass_also_writes_the_quantized_activations(dtype, to):
    """x_q from the quantizer's own pass equals the rebuild (and `codes.div(s).to(dt)`),
    NaN and infinite tokens included."""
    x = hard_inputs(torch.float32, seed=6)
    x[0, 3], x[1, 7] = float("nan"), float("inf")
    x = x.to(dtype)
    if not native.takes_activations(x, to):
        assert (dtype == torch.float64) != (to == torch.float64)  # f64 pairs with f64 only
        return
    codes, inv, x_q = native.quantize_activations(x, 8, to)
    want_codes, want_inv = torch_activation_quant(x, 8)
    assert torch.equal(codes, want_codes) and x_q.dtype == to
    torch.testing.assert_close(inv, want_inv, rtol=0, atol=0, equal_nan=True)
    want = codes.div(inv).to(to)
    torch.testing.assert_close(x_q, want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(
        native.rebuild_activations(codes, inv, to), want, rtol=0, atol=0, equal_nan=True
    )


@needs_native
@pytest.mark.parametrize("to", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_the_quantizer_writes_x_q_alone_when_no_codes_are_wanted(to):
    """codes=False: no codes tensor, the same scales and x_q bits as with codes (each row's
    codes go through a scratch row); NaN and infinite tokens included, many threads."""
    x = hard_inputs(torch.float32, rows=400, seed=7)  # above the one-thread size
    x[0, 3], x[1, 7] = float("nan"), float("inf")
    _, inv, x_q = native.quantize_activations(x, 8, to)
    none, inv2, x_q2 = native.quantize_activations(x, 8, to, codes=False)
    assert none is None
    torch.testing.assert_close(inv2, inv, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(x_q2.view(torch.int16 if to != torch.float32 else torch.int32),
                       x_q.view(torch.int16 if to != torch.float32 else torch.int32))  # fmt: skip
    with pytest.raises(ValueError, match="codes=False needs a dequantized dtype"):
        native.quantize_activations(x, 8, codes=False)


def test_reusable_only_when_nothing_else_holds_the_buffer():
    t = torch.empty(4, 3)
    assert native.reusable(t, (4, 3), torch.float32, "cpu")
    assert not native.reusable(t, (3, 4), torch.float32, "cpu")
    assert not native.reusable(t, (4, 3), torch.bfloat16, "cpu")
    assert not native.reusable(t, (4, 3), torch.float32, "meta")  # another device
    view = t[:2]
    assert not native.reusable(t, (4, 3), torch.float32, "cpu")
    del view
    assert native.reusable(t, (4, 3), torch.float32, "cpu")

    class Save(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(b)
            return a * 2

        @staticmethod
        def backward(ctx, g):
            return g, None

    y = Save.apply(torch.ones(2, requires_grad=True), t)
    assert not native.reusable(t, (4, 3), torch.float32, "cpu")  # autograd holds it
    del y
    assert native.reusable(t, (4, 3), torch.float32, "cpu")


@needs_native
def test_the_kernel_is_built_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITNET_TRAINING_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None and native.build_error() is None
    built = list(tmp_path.glob("bitlinear_cpu-*.so"))
    assert len(built) == 1
    inode = built[0].stat().st_ino
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None
    assert [p.stat().st_ino for p in tmp_path.glob("*.so")] == [inode]  # loaded, not rebuilt
    assert not list(tmp_path.glob("*.so.tmp*")) and len(list(tmp_path.iterdir())) == 1


def test_builds_unused_for_a_month_are_pruned_from_the_cache(tmp_path, monkeypatch):
    """Each load marks its build used; builds of other sources, compilers or CPUs that no
    process loaded for 30 days go, recent ones and other files stay."""
    monkeypatch.setenv("BITNET_TRAINING_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None
    (ours,) = tmp_path.glob("bitlinear_cpu-*.so")
    month = time.time() - 31 * 86400
    os.utime(ours, (month, month))  # ours too: used now again
    for name in ("bitlinear_cpu-old.so", "bitlinear_cpu-recent.so", "notes.so"):
        (tmp_path / name).write_bytes(b"")
    os.utime(tmp_path / "bitlinear_cpu-old.so", (month, month))
    os.utime(tmp_path / "notes.so", (month, month))
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is not None
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([ours.name, "bitlinear_cpu-recent.so", "notes.so"])
    assert time.time() - ours.stat().st_mtime < 3600


def test_without_a_compiler_torch_runs_and_native_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("BITNET_TRAINING_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_compiler", lambda: None)
    assert native.library() is None
    assert "no C compiler" in native.build_error()
    with pytest.raises(ConfigError, match="kernels.*cannot be built.*no C compiler"):
        QATConfig(kernels="native")
    QATConfig(kernels="auto")  # falls back to the PyTorch ops, same values

    from bitnet_training import BitLinear

    layer = BitLinear(16, 8, config=QATConfig())
    ref = BitLinear(16, 8, config=QATConfig(kernels="torch"))
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), ref(x))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_propagate_as_in_the_torch_form(dtype):
    """A NaN in a token keeps that token's scale NaN (the loss must not hide divergence);
    an infinite one gives scale 0. Codes, scales and dequantized weights match PyTorch's."""
    x = hard_inputs(torch.float32, rows=6, cols=40)
    x[0, 3] = float("nan")
    x[1, 7] = float("inf")
    x[2, 0] = -float("inf")
    x = x.to(dtype)
    codes, inv = native.quantize_activations(x, 8)
    want_codes, want_inv = torch_activation_quant(x, 8)
    assert torch.equal(codes, want_codes)
    torch.testing.assert_close(inv, want_inv, rtol=0, atol=0, equal_nan=True)
    assert inv[0].isnan().all() and inv[3:].isfinite().all()
    for bad in (float("nan"), float("inf"), 3e38):
        w = hard_inputs(torch.float32, rows=8, cols=16) * 0.02
        w[2, 2] = bad
        q, dq = native.ternary_quantize(w, "tensor", dtype)
        want = ternary_quantize(w, "tensor")
        assert torch.equal(q.codes, want.codes)
        want_dq = dequantize(want, torch.float32).to(dtype)
        torch.testing.assert_close(dq, want_dq, rtol=0, atol=0, equal_nan=True)


@needs_native
def test_output_buffers_of_the_wrong_kind_are_refused():
    codes = torch.zeros(4, 8, dtype=torch.int8)
    s = torch.ones(4, 1)
    for out in (
        torch.empty(4, 8, dtype=torch.bfloat16),
        torch.empty(8, 4),
        torch.empty(4, 16)[:, :8],
    ):
        with pytest.raises(ValueError, match="output buffer"):
            native.rebuild_activations(codes, s, torch.float32, out)
    with pytest.raises(ValueError, match="output buffer"):
        native.ternary_quantize(
            torch.randn(4, 8), "tensor", torch.float32, (None, torch.empty(4, 8, device="meta"))
        )


def test_a_named_compiler_that_does_not_exist_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("BITNET_TRAINING_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setattr(native, "_state", {})
    assert native.library() is None
    assert "no-such-cc is not an executable compiler" in native.build_error()
