"""The integer GEMM kernels: each equals torch._int_mm rounded once to the compute dtype."""

import time

import pytest
import torch

from bitnet_training.quant import gemm

SHAPES = [(1, 3, 2), (7, 64, 10), (37, 384, 128), (256, 1000, 3)]


def _codes(n, k, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    a[0, : min(k, 4)] = -128  # the extremes
    w = torch.randint(-1, 2, (m, k), generator=g, dtype=torch.int8)
    return a, w


@pytest.mark.parametrize("kernel", gemm.KERNELS)
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_each_kernel_equals_int_mm_rounded_once(kernel, dt, shape):
    n, k, m = shape
    why = gemm.unavailable(kernel, n, k, m, dt, "cpu")
    if why is not None:
        assert (kernel == "onednn" and dt == torch.float64) or "oneDNN" in why
        pytest.skip(why)
    a, w = _codes(n, k, m)
    want = torch._int_mm(a, w.t().contiguous()).to(dt)
    got = gemm.Prepared(kernel, w, dt)(a)
    assert got.dtype == dt and torch.equal(got, want)


@pytest.mark.parametrize("kernel", gemm.KERNELS)
@pytest.mark.parametrize("dt", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_scaled_output_is_the_product_times_both_scales(kernel, dt, per_channel):
    """`scaled`: the layer's y = (a W^T) * gamma / s, the same bits from every kernel and
    from the native in-place pass (int_mm, float32) as from the PyTorch ops."""
    n, k, m = 37, 384, 128
    if gemm.unavailable(kernel, n, k, m, dt, "cpu") is not None:
        pytest.skip("kernel unavailable here")
    a, w = _codes(n, k, m)
    g = torch.Generator().manual_seed(1)
    inv = torch.rand(n, 1, generator=g) * 100 + 1
    gamma = torch.rand(1, m, generator=g) + 0.1 if per_channel else torch.tensor(0.03)
    exact = torch._int_mm(a, w.t().contiguous()).to(dt)
    if per_channel:
        want = exact.div_(inv.to(dt)).mul_(gamma.to(dt))
    else:
        want = exact.mul_((gamma / inv).to(dt))
    prepared = gemm.Prepared(kernel, w, dt)
    assert prepared.out_features == m
    for native_ok in (True, False):
        got = prepared.scaled(a, inv, gamma, native_ok)
        assert got.dtype == dt and got.shape == (n, m) and torch.equal(got, want)


def test_int_mm_on_cpu_takes_the_codes_as_they_are():
    a, w = _codes(64, 96, 48)
    prepared = gemm.Prepared("int_mm", w, torch.float32)
    assert prepared.operand is w  # no transposed copy: CPU's _int_mm reads the view
    assert torch.equal(prepared(a), torch._int_mm(a, w.t().contiguous()).float())


def test_a_laid_out_weight_is_rewritten_in_place_when_free():
    a, w = _codes(8, 32, 16)
    _, w2 = _codes(8, 32, 16, seed=1)
    for kernel in ("float",):  # (int_mm lays out nothing on CPU)
        first = gemm.Prepared(kernel, w, torch.float32)
        buf = first.operand
        second = gemm.Prepared(kernel, w2, torch.float32, reuse=first)
        assert second.operand is buf  # nothing else held it
        assert torch.equal(second(a), torch._int_mm(a, w2.t().contiguous()).float())
        held = second.operand.view(-1)  # now a view holds it: a fresh buffer is taken
        third = gemm.Prepared(kernel, w, torch.float32, reuse=second)
        assert third.operand is not buf and held.data_ptr() == buf.data_ptr()


def test_unavailable_says_why():
    assert "float64" in gemm.unavailable("onednn", 8, 64, 8, torch.float64, "cpu")
    assert "2^17" in gemm.unavailable("int_mm", 8, 2**17, 8, torch.float32, "cpu")
    # Weight codes up to 128 (8-bit weights): float32 sums stay exact only for short rows.
    assert gemm.unavailable("float", 8, 512, 8, torch.float32, "cpu", code_max=128) is None
    assert "could round" in gemm.unavailable("float", 8, 1024, 8, torch.float32, "cpu", 128)
    for kernel in gemm.KERNELS:  # an fp16 output overflows above 65504
        assert "65504" in gemm.unavailable(kernel, 8, 64, 8, torch.float16, "cpu")
    with pytest.raises(ValueError, match="unknown GEMM kernel"):
        gemm.unavailable("cutlass", 8, 64, 8, torch.float32, "cpu")


def test_choice_is_measured_once_and_leaves_the_global_rng_alone(monkeypatch):
    monkeypatch.setattr(gemm, "_DECISIONS", {})
    calls = []
    real = gemm._measure
    monkeypatch.setattr(gemm, "_measure", lambda *a: calls.append(a) or real(*a))
    state = torch.get_rng_state()
    first = gemm.choose(100, 96, 40, torch.float32, "cpu")
    assert torch.equal(torch.get_rng_state(), state)
    assert first in gemm.KERNELS
    # The same shape (rows rounded up to a power of two) is not measured again.
    assert gemm.choose(120, 96, 40, torch.float32, "cpu") == first
    assert len(calls) == 1
    assert list(gemm.decisions().values()) == [first]
    # One allowed kernel: nothing to measure, but recorded (the run summary lists it).
    assert gemm.choose(100, 96, 40, torch.float32, "cpu", ("float",)) == "float"
    assert len(calls) == 1 and len(gemm._DECISIONS) == 2
    assert gemm.choose(8, 2**17, 8, torch.float32, "cpu") is None
    # Without the native kernels (qat.kernels: torch) the probe rescales as the layer then
    # does, with PyTorch ops: a decision of its own, measured once more.
    gemm.choose(100, 96, 40, torch.float32, "cpu", native_ok=False)
    assert len(calls) == 2 and calls[-1][-1] is False


def test_a_kernel_with_no_fast_path_is_screened_out_before_any_full_size_run(monkeypatch):
    """A kernel over SCREEN_FACTOR times slower on the screen's small product (oneDNN's s8
    linear on a CPU without AMX ran ~500x slower) is dropped for the process: never timed
    at a layer's shape, never chosen; the screen runs once per (device, dtype, kernels)."""
    monkeypatch.setattr(gemm, "_DECISIONS", {})
    monkeypatch.setattr(gemm, "_SCREENS", {})
    real = gemm.Prepared.scaled
    shapes = []

    def scaled(self, a, *args):
        shapes.append((self.kernel, a.shape[0]))
        if self.kernel == "float":
            time.sleep(0.05)  # no fast path: ~1000x the int8 GEMM of 64 x 256 -> 256
        return real(self, a, *args)

    monkeypatch.setattr(gemm.Prepared, "scaled", scaled)
    measured = []
    monkeypatch.setattr(gemm, "_measure", lambda *a: measured.append(a) or "int_mm")
    allowed = ("int_mm", "float")
    assert gemm.choose(1000, 96, 40, torch.float32, "cpu", allowed) == "int_mm"
    assert gemm.choose(4000, 512, 40, torch.float32, "cpu", allowed) == "int_mm"
    assert measured == []  # one kernel left: nothing to measure at full size
    assert {n for _, n in shapes} == {gemm.SCREEN_SHAPE[0]}  # only the screen's rows ran
    assert len(shapes) == 6  # 3 calls per kernel, once
    (why,) = gemm.screened_out().values()
    assert list(gemm.screened_out()) == ["cpu float32 float"] and "x slower" in why
    # Kernels within the factor of each other are all measured at the layer's shape.
    monkeypatch.setattr(gemm, "SCREEN_FACTOR", float("inf"))
    monkeypatch.setattr(gemm, "_SCREENS", {})
    gemm.choose(8000, 96, 40, torch.float32, "cpu", allowed)
    assert [a[0] for a in measured] == [["int_mm", "float"]]
