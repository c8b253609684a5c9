"""The CUDA activation quantizer (a Triton kernel) against the PyTorch composition it
replaces, run in Triton's CPU interpreter (`TRITON_INTERPRET=1`): the same code, and here the
same bits as on a GPU wherever the interpreter's arithmetic is IEEE (the kernel does its own
bfloat16 rounding for that reason). On a GPU the kernel is also checked on the device itself
before its first use; these tests show that check refuses a kernel one bit off."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from bitnet_training import BitLinear, QATConfig
from bitnet_training.errors import ConfigError
from bitnet_training.quant import native, triton_kernels

# BITNET_TRAINING_TEST_CUDA=1 (on a machine with a GPU, set before pytest starts: see
# conftest.py) runs these on the GPU, compiled, instead of in the interpreter.
DEVICE = "cuda" if os.environ.get("BITNET_TRAINING_TEST_CUDA") == "1" else "cpu"
pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("triton") is None,
        reason="Triton is installed with the dev extras on Linux x86-64",
    ),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # NumPy's, on NaN and inf rows
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(),
        reason="BITNET_TRAINING_TEST_CUDA=1, but PyTorch sees no GPU",
    ),
]

IN = [torch.float32, torch.bfloat16, torch.float16]
OUT = [None, torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    """Triton's interpreter (conftest.py turns it on) on CPU tensors, with a fresh kernel
    and no checks cached."""
    monkeypatch.setattr(triton_kernels, "_state", {})
    monkeypatch.setattr(triton_kernels, "_CHECKED", {})
    monkeypatch.setattr(triton_kernels, "DEVICES", ("cuda", DEVICE))
    assert triton_kernels.kernel() is not None, triton_kernels.error()
    from triton.runtime.interpreter import InterpretedFunction

    interpreted = isinstance(triton_kernels.kernel(), InterpretedFunction)
    assert interpreted == (DEVICE == "cpu"), "TRITON_INTERPRET: set for CPU runs only"


def torch_form(x, bits, dt=None):
    """The eager composition (bitnet_training.nn.bitlinear's fallback): inv = qp / absmax."""
    xf = x.float()
    inv = (2 ** (bits - 1) - 1) / xf.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-5)
    codes = (xf * inv).round_().to(torch.int8)
    return codes, inv, None if dt is None else codes.div(inv).to(dt)


def assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        if g is None:
            assert w is None
        else:
            assert g.dtype == w.dtype and g.shape == w.shape
            torch.testing.assert_close(g, w, rtol=0, atol=0, equal_nan=True)


def hard_rows(k, seed=0, positions=None):
    """Rows of length k with the largest magnitude (either sign), a NaN or an infinity at
    each of `positions` (default: all), exact ties (halves after a scale of 1), zeros, tiny
    and subnormal rows."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for pos in range(k) if positions is None else positions:
        for big in (3.5, -3.5, float("nan"), float("inf"), -float("inf")):
            row = torch.randn(k, generator=g)
            row[pos] = big
            rows.append(row)
    ties = torch.randint(-254, 255, (k,), generator=g) / 2
    ties[0] = 127  # absmax 127: scale exactly 1, so every half is a tie
    rows += [ties, torch.zeros(k), torch.full((k,), 1e-7), torch.full((k,), -2e-39)]
    rows.append(torch.randn(k, generator=g) * 3e4)
    return torch.stack(rows).to(DEVICE)


@pytest.mark.parametrize("out", OUT, ids=str)
@pytest.mark.parametrize("dtype", IN, ids=str)
def test_codes_scales_and_x_q_equal_the_torch_form(dtype, out):
    for k, positions in ((1, None), (3, None), (64, (0, 31, 63)), (65, (0, 63, 64))):
        x = hard_rows(k, positions=positions).to(dtype)  # whole blocks and masked tails
        for bits in (8, 4) if out is None else (8,):
            got = triton_kernels.quantize_activations(x, bits, out)
            assert_same(got if out else (*got, None), torch_form(x, bits, out))


def test_bfloat16_rounding_is_to_nearest_even_as_pytorch_rounds():
    """x_q's float32 -> bfloat16 (integer arithmetic in the kernel: the interpreter's own
    conversion truncates): exact ties of both parities, one bit either side of them, carries
    into the exponent, the largest floats (to infinity), subnormals, infinities and NaN."""
    g = torch.Generator().manual_seed(0)
    high = torch.randint(0, 1 << 16, (4096,), generator=g, dtype=torch.int64) << 16
    low = torch.tensor([0x0000, 0x7FFF, 0x8000, 0x8001, 0xFFFF])
    bits = (high[:, None] | low[None, :]).flatten()
    bits = torch.cat([bits, torch.tensor([0x7F7FFFFF, 0x7F7F8000, 0x00000001, 0x7F800000])])
    x = bits.to(torch.int32).view(torch.float32)
    x = torch.cat([x, -x, torch.tensor([float("nan")])]).to(DEVICE)
    got, want = triton_kernels.to_bfloat16(x), x.to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


def test_rows_longer_than_a_block_are_reduced_across_blocks(monkeypatch):
    """A row the kernel holds in several blocks: its max (or NaN) in any block is found."""
    monkeypatch.setattr(triton_kernels, "MAX_BLOCK", 16)
    x = hard_rows(50, seed=1).to(torch.bfloat16)
    got = triton_kernels.quantize_activations(x, 8, torch.bfloat16)
    assert_same(got, torch_form(x, 8, torch.bfloat16))


def test_x_q_alone_when_no_codes_are_wanted():
    x = hard_rows(20).t().contiguous().t()  # a transposed view: made contiguous first
    codes, inv, x_q = triton_kernels.quantize_activations(x, 8, torch.bfloat16, codes=False)
    _, want_inv, want_x_q = torch_form(x, 8, torch.bfloat16)
    assert codes is None
    assert_same((inv, x_q), (want_inv, want_x_q))
    with pytest.raises(ValueError, match="codes=False needs a dequantized dtype"):
        triton_kernels.quantize_activations(x, 8, None, codes=False)


def test_inputs_it_does_not_take_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="no Triton kernel for torch.float64"):
        triton_kernels.quantize_activations(torch.randn(4, 8, dtype=torch.float64), 8)
    monkeypatch.setattr(triton_kernels, "DEVICES", ("cuda",))
    assert not triton_kernels.takes_activations(torch.randn(4, 8))  # CPU: the C kernels
    with pytest.raises(ValueError, match="on cpu"):
        triton_kernels.quantize_activations(torch.randn(4, 8), 8)


def fused_runs(monkeypatch):
    """Count the Triton kernel's calls from BitLinear, with the C kernels out of the way."""
    monkeypatch.setattr(native, "takes_activations", lambda x, dq=None: False)
    calls = []
    real = triton_kernels.quantize_activations

    def spy(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)

    monkeypatch.setattr(triton_kernels, "quantize_activations", spy)
    return calls


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bitlinear_through_the_kernel_equals_the_torch_ops(precision, monkeypatch):
    """Forward and both gradients, with the kernel's codes (fp32: integer GEMM) or its x_q
    (bf16 autocast: the float GEMM of x_q, saved for the backward)."""
    calls = fused_runs(monkeypatch)
    torch.manual_seed(0)
    layer = BitLinear(48, 24, config=QATConfig(kernels="native"), device=DEVICE)
    ref = BitLinear(48, 24, config=QATConfig(kernels="torch"), device=DEVICE)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2, 7, 48, device=DEVICE)
    outs = []
    for lin in (layer, ref):
        xi = x.clone().requires_grad_()
        with torch.autocast(DEVICE, torch.bfloat16, enabled=precision == "bf16"):
            y = lin(xi)
        y.float().square().sum().backward()
        outs.append((y, xi.grad, lin.weight.grad, lin.bias.grad))
    assert calls, "the Triton kernel did not run"
    for got, want in zip(*outs, strict=True):
        assert torch.equal(got, want)


def test_a_kernel_one_bit_off_is_never_used(monkeypatch):
    """The check on the device: `auto` warns and runs PyTorch's ops (same values), `native`
    refuses; the probe's own rows catch a wrong tie, NaN row or rounding."""
    calls = fused_runs(monkeypatch)
    real = triton_kernels._launch

    def off_by_one_tie(x2, bits, dq, codes):
        c, inv, x_q = real(x2, bits, dq, codes)
        if c is not None:
            c[0, 1] += 1  # the probe's first row: ties
        return c, inv, x_q

    monkeypatch.setattr(triton_kernels, "_launch", off_by_one_tie)
    layer = BitLinear(16, 8, config=QATConfig(), device=DEVICE)
    ref = BitLinear(16, 8, config=QATConfig(kernels="torch"), device=DEVICE)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(5, 16, device=DEVICE)
    with pytest.warns(UserWarning, match="differs from PyTorch's ops.*using PyTorch's ops"):
        assert torch.equal(layer(x), ref(x))
    assert not calls and triton_kernels.checks() == {f"{x.device} float32 -> codes (8 bits)": False}
    strict = BitLinear(16, 8, config=QATConfig(kernels="native"), device=DEVICE)
    with pytest.raises(ConfigError, match="kernels.*differs from PyTorch's ops"):
        strict(x.clone())  # a new tensor: not the codes the first layer shared


def test_without_triton_auto_runs_torch_and_native_is_refused(monkeypatch):
    monkeypatch.setattr(triton_kernels, "_state", {})

    def no_triton():
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(triton_kernels, "_define", no_triton)
    assert triton_kernels.kernel() is None
    assert "No module named 'triton'" in triton_kernels.error()
    fused_runs(monkeypatch)
    layer = BitLinear(16, 8, config=QATConfig(), device=DEVICE)
    ref = BitLinear(16, 8, config=QATConfig(kernels="torch"), device=DEVICE)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(5, 16, device=DEVICE)
    assert torch.equal(layer(x), ref(x))
    with pytest.raises(ConfigError, match="kernels.*No module named 'triton'"):
        BitLinear(16, 8, config=QATConfig(kernels="native"), device=DEVICE)(x.clone())


def test_the_check_runs_once_per_device_dtypes_and_block(monkeypatch):
    launches = []
    real = triton_kernels._launch
    monkeypatch.setattr(
        triton_kernels, "_launch", lambda *a: launches.append(a[0].shape[0]) or real(*a)
    )
    x = torch.randn(100, 32, device=DEVICE)
    for _ in range(3):
        triton_kernels.checked(x, 8, torch.bfloat16, True)
    assert len(launches) == 1 and launches[0] == 6 + 48 + 64  # probe: 6 rows, 48 near ties, 64 of x
    triton_kernels.checked(x, 8, None, True)
    triton_kernels.checked(torch.randn(3, 1000, device=DEVICE), 8, None, True)
    assert len(launches) == 3
    assert triton_kernels.checks() == {
        f"{x.device} float32 -> bfloat16 (8 bits)": True,
        f"{x.device} float32 -> codes (8 bits)": True,  # two row lengths (block sizes), both exact
    }


# Compiles the kernel for an H100 / H200 (sm_90) without a GPU, as the launcher would
# (LAUNCH_OPTIONS), and with Triton's default fusion: whether the PTX has fused
# multiply-adds and IEEE divisions.
PTX = """
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from bitnet_training.quant import _triton_act_quant as kernels
from bitnet_training.quant.triton_kernels import LAUNCH_OPTIONS

sig = {"x_ptr": "*bf16", "codes_ptr": "*i8", "inv_ptr": "*fp32", "xq_ptr": "*i16", "k": "i32",
       "qp": "fp32", "eps": "fp32", "WRITE_CODES": "constexpr", "WRITE_XQ": "constexpr",
       "XQ_BF16": "constexpr", "BLOCK": "constexpr"}
const = {"WRITE_CODES": True, "WRITE_XQ": True, "XQ_BF16": True, "BLOCK": 1024}
out = {}
for name, opts in (("launch", LAUNCH_OPTIONS), ("fused", {"enable_fp_fusion": True})):
    src = ASTSource(kernels.act_quant, sig, constexprs=const)
    ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts).asm["ptx"]
    out[name] = {"fma": "fma.rn.f32" in ptx, "div_rn": "div.rn.f32" in ptx}
print(json.dumps(out))
"""


def test_the_gpu_code_rounds_where_pytorch_rounds():
    """No fused multiply-add in the PTX the launcher's options give (Triton fuses by
    default, which rounds x * s + 1.5 * 2^23 once), and IEEE division."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-c", PTX], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    ptx = json.loads(done.stdout.splitlines()[-1])
    assert ptx["launch"] == {"fma": False, "div_rn": True}
    assert ptx["fused"]["fma"]  # what the option prevents: the test can tell


def test_the_check_refuses_a_kernel_that_rounds_once(monkeypatch):
    """A fused multiply-add kernel (x * s rounded once, with the code's rounding): the
    probe's near-tie rows (max m holding m / 2) give it away, though ties and random rows
    would not."""
    real = triton_kernels._launch

    def fused(x2, bits, dq, codes):
        _, inv, x_q = real(x2, bits, dq, codes)
        once = (x2.double() * inv.double()).round().to(torch.int8)
        return once, inv, x_q

    monkeypatch.setattr(triton_kernels, "_launch", fused)
    x = torch.randn(8, 96, device=DEVICE)
    assert torch.equal(fused(x, 8, None, True)[0], torch_form(x, 8)[0])  # random rows: same
    with pytest.warns(UserWarning, match="differs from PyTorch's ops"):
        assert not triton_kernels.checked(x, 8, None, True)
