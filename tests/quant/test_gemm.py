"""The integer GEMM kernels: each equals torch._int_mm rounded once to the compute dtype."""

import time

import pytest
import torch

from bitnet_training import BitNetError
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


@pytest.fixture
def fresh_paths(monkeypatch):
    """No `integer_path` decisions held (as in a new process), restored after the test."""
    monkeypatch.setattr(gemm, "_PATHS", {})
    monkeypatch.setattr(gemm, "_DECISIONS", {})


def test_integer_path_is_measured_once_per_shape_and_can_be_saved(monkeypatch, fresh_paths):
    """The integer-vs-float GEMM choice is measured (really: a bool from timing both) once
    per (device, dtype, in, out) on a fixed probe; `path_state` / `load_path_state` carry it
    (a checkpoint); the kernels `decisions` reports leave out shapes that run the float
    GEMM of x_q."""
    real = gemm._measure_path
    calls = []
    monkeypatch.setattr(gemm, "_measure_path", lambda *a: calls.append(a) or real(*a))
    dt = torch.bfloat16
    first = gemm.integer_path(96, 40, dt, "cpu", ("int_mm",), rows=64)
    assert isinstance(first, bool) and len(calls) == 1
    assert calls[0][:4] == (("int_mm",), 64, 96, 40)
    assert gemm.integer_path(96, 40, dt, "cpu") is first  # measured: held
    assert len(calls) == 1
    saved = gemm.path_state()
    assert saved == [["cpu", "bfloat16", 96, 40, first]]
    assert gemm.paths() == {"cpu bfloat16 96 -> 40": "integer" if first else "float"}
    gemm._PATHS.clear()
    gemm.load_path_state([["cpu", "bfloat16", 96, 40, not first]])
    assert gemm.integer_path(96, 40, dt, "cpu") is (not first)
    assert len(calls) == 1  # loaded: not measured again
    for bad in (["cpu", "bfloat17", 96, 40, True], ["cpu", "bfloat16", "96", 40, True], [1]):
        with pytest.raises(BitNetError, match="matmul_paths entry .* is not"):
            gemm.load_path_state([bad])
    gemm.choose(64, 96, 40, dt, "cpu", ("int_mm",))
    gemm.load_path_state([["cpu", "bfloat16", 96, 40, False]])
    assert gemm.decisions() == {}  # the float GEMM of x_q runs: no kernel reported
    gemm.load_path_state([["cpu", "bfloat16", 96, 40, True]])
    assert list(gemm.decisions().values()) == ["int_mm"]
    # No integer kernel can run the shape: the float GEMM, nothing timed.
    assert gemm.integer_path(2**17, 8, dt, "cpu") is False
    # Traced by torch.compile: nothing measured; the decision held, else the float GEMM.
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert gemm.integer_path(96, 40, dt, "cpu") is True
    assert gemm.integer_path(80, 40, dt, "cpu") is False
    assert len(calls) == 2


def test_the_measurement_times_both_paths_as_the_layer_runs_them(monkeypatch, fresh_paths):
    """The integer path is timed with its weight layout, rescaled product and (for a weight
    that trains) its x_q for the weight gradient; the float path with the GEMM of x_q (and
    a rebuild too where codes are saved); the integer one wins only when it takes at most
    PATH_FACTOR of the other's time."""
    rebuilt = []

    def rebuild(codes, inv):
        rebuilt.append(codes.shape)
        return codes.div(inv).to(torch.bfloat16)

    slow = {"integer": 0.0, "float": 0.0}
    real_scaled, real_linear = gemm.Prepared.scaled, gemm.F.linear

    def scaled(self, *a):
        time.sleep(slow["integer"])
        return real_scaled(self, *a)

    def linear(*a):
        time.sleep(slow["float"])
        return real_linear(*a)

    monkeypatch.setattr(gemm.Prepared, "scaled", scaled)
    monkeypatch.setattr(gemm.F, "linear", linear)
    args = (("int_mm",), 48, 64, 32, torch.bfloat16, torch.device("cpu"), 1, True)
    slow["integer"] = 0.01
    assert gemm._measure_path(*args, rebuild, False) is False
    # The rebuild: once for the float path's x_q, then once per integer round.
    rounds = gemm.WARMUP + gemm.ROUNDS
    assert rebuilt == [(48, 64)] * (1 + rounds)
    rebuilt.clear()
    assert gemm._measure_path(*args, rebuild, True) is False
    assert rebuilt == [(48, 64)] * (1 + 2 * rounds)  # codes saved: both paths rebuild
    slow.update(integer=0.0, float=0.01)
    assert gemm._measure_path(*args, None, False) is True


AGREE = """
import sys, torch, torch.distributed as dist
from bitnet_training.quant import gemm
rank, store = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
gemm._measure_path = lambda *a: rank == 0  # the ranks measure differently
gemm.integer_path(16, 8, torch.bfloat16, "cpu")
if rank == 1:
    gemm.integer_path(24, 8, torch.bfloat16, "cpu")  # a shape only rank 1 has
gemm.agree_paths()
print(sorted(gemm.path_state()))
dist.destroy_process_group()
"""


def test_ranks_hold_rank_zeros_decisions_after_agreeing(tmp_path):
    """`agree_paths` (a collective the Trainer makes at setup): every rank ends with the
    same decisions, rank 0's where it has one, the lowest other rank's elsewhere."""
    import subprocess
    import sys

    store = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", AGREE, str(r), str(store)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[1][1][-2000:] + outs[0][1][-2000:]
    want = "[['cpu', 'bfloat16', 16, 8, True], ['cpu', 'bfloat16', 24, 8, False]]"
    assert [out.strip().splitlines()[-1] for out, _ in outs] == [want, want]
