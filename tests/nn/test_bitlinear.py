"""BitLinear against nn.Linear (quantization off) and the BitNet reference form (on)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bitnet_training import BitLinear, QATConfig
from bitnet_training.errors import BitNetError, ConfigError
from bitnet_training.nn.norm import RMSNorm
from bitnet_training.quant.functional import dequantize, ternary_quantize


def ref_weight_quant(w):
    """BitNet FAQ code: absmean ternary, per tensor."""
    scale = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * scale).round().clamp(-1, 1) / scale


def ref_activation_quant(x, bits=8):
    qp = 2 ** (bits - 1) - 1
    scale = qp / x.abs().max(dim=-1, keepdim=True).values.clamp(min=1e-5)
    return (x * scale).round().clamp(-qp - 1, qp) / scale


def ref_bitlinear(x, w, b=None, bits=8):
    """The reference training form: y = linear(x + sg(q(x) - x), w + sg(q(w) - w))."""
    xq = x + (ref_activation_quant(x, bits) - x).detach()
    wq = w + (ref_weight_quant(w) - w).detach()
    return F.linear(xq, wq, b)


VARIANTS = {
    "fused-int": QATConfig(),
    "fused-float": QATConfig(integer_matmul=False),
    "plain": QATConfig(fused=False),
    "no-cache": QATConfig(cache_quantized_weight=False),
}


def _pair(config, bias=True, shape=(2, 5, 48), out=24):
    lin = nn.Linear(shape[-1], out, bias=bias)
    layer = BitLinear.from_linear(copy.deepcopy(lin), config)
    x = torch.randn(*shape)
    return lin, layer, x


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("bias", [True, False])
def test_equals_reference_formula_forward_and_gradients(name, bias):
    lin, layer, x = _pair(VARIANTS[name], bias)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = layer(x1)
    y_ref = ref_bitlinear(x2, lin.weight, lin.bias)
    # Same codes; the integer GEMM sums exactly, the float path in another order: 1e-5.
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.weight.grad, lin.weight.grad, rtol=1e-5, atol=1e-5)
    if bias:
        torch.testing.assert_close(layer.bias.grad, lin.bias.grad)


def test_equals_nn_linear_when_quantization_is_off():
    lin, layer, x = _pair(QATConfig.off())
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, y_ref = layer(x1), lin(x2)
    assert torch.equal(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    assert torch.equal(x1.grad, x2.grad) and torch.equal(layer.weight.grad, lin.weight.grad)


def test_bf16_autocast_matches_reference_under_autocast():
    lin, layer, x = _pair(QATConfig(integer_matmul=False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        y_ref = ref_bitlinear(x, lin.weight, lin.bias)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_int = BitLinear.from_linear(lin, QATConfig())(x)
    assert y_int.dtype == torch.bfloat16
    torch.testing.assert_close(y_int.float(), y_ref.float(), rtol=2e-2, atol=2e-2)


def test_integer_matmul_equals_fake_quant_path():
    lin = nn.Linear(256, 128)
    x = torch.randn(64, 256) * 3
    for per_channel in (False, True):
        a = BitLinear.from_linear(lin, QATConfig(per_channel=per_channel))
        b = BitLinear.from_linear(lin, QATConfig(per_channel=per_channel, integer_matmul=False))
        torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


def _saved_activations(fn, n_tokens):
    """(dtype, bytes) of each tensor autograd saves whose first dim is the token count."""
    saved = []

    def pack(t):
        if t.dim() and t.shape[0] == n_tokens:  # activations; the weight is not one
            saved.append((t.dtype, t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


def test_fused_saves_int8_codes_not_float_activations():
    lin = nn.Linear(512, 512, bias=False)
    x = torch.randn(256, 512, requires_grad=True)
    fused = BitLinear.from_linear(lin, QATConfig())
    ours = _saved_activations(lambda: fused(x), 256)
    ref = _saved_activations(lambda: ref_bitlinear(x, lin.weight), 256)
    # int8 codes (1 byte each) and one float32 scale per token...
    assert sorted(ours, key=str) == sorted(
        [(torch.int8, 256 * 512), (torch.float32, 256 * 4)], key=str
    )
    # ...against the float32 quantized activations of the reference form (4 bytes each).
    assert (torch.float32, 256 * 512 * 4) in ref


def test_weight_quantized_once_per_optimizer_step():
    _, layer, x = _pair(QATConfig(), bias=False)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(x)
    first = layer._cache[1]
    layer(x)
    assert layer._cache[1] is first  # same weight version: reused
    layer(x).sum().backward()
    opt.step()
    y = layer(x)
    assert layer._cache[1] is not first  # the step changed the weight: re-quantized
    torch.testing.assert_close(y, ref_bitlinear(x, layer.weight.detach()), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        layer.weight.mul_(2)  # any in-place change invalidates the cache
    torch.testing.assert_close(
        layer(x), ref_bitlinear(x, layer.weight.detach()), rtol=1e-5, atol=1e-5
    )


def test_same_output_in_train_and_eval():
    _, layer, x = _pair(QATConfig())
    y_train = layer.train()(x)
    y_eval = layer.eval()(x)
    assert torch.equal(y_train, y_eval)


def test_from_linear_keeps_parameters_device_dtype():
    lin = nn.Linear(16, 8).double()
    layer = BitLinear.from_linear(lin)
    assert isinstance(layer, nn.Linear)
    assert layer.weight is lin.weight and layer.bias is lin.bias
    assert layer.weight.dtype == torch.float64
    assert list(layer.state_dict()) == ["weight", "bias"]
    assert layer(torch.randn(3, 16, dtype=torch.float64)).dtype == torch.float64


def test_quantized_weight_returns_codes_and_scale():
    layer = BitLinear(32, 16)
    codes, scale, zp = layer.quantized_weight()
    assert codes.dtype == torch.int8 and set(codes.unique().tolist()) <= {-1, 0, 1}
    assert scale.item() == pytest.approx(layer.weight.abs().mean().item(), rel=1e-6)
    assert zp is None
    codes8, scale8, _ = BitLinear(
        32, 16, config=QATConfig(weight_bits=8, per_channel=True)
    ).quantized_weight()
    assert scale8.shape == (16, 1) and codes8.abs().max() == 127


def test_input_norm_normalises_before_quantizing():
    lin, layer, x = _pair(QATConfig(norm_placement="input"), bias=False)
    assert isinstance(layer.norm, RMSNorm)
    norm = RMSNorm(x.shape[-1])
    torch.testing.assert_close(layer(x), ref_bitlinear(norm(x), lin.weight), rtol=1e-5, atol=1e-5)
    assert "norm.weight" in layer.state_dict()


@pytest.mark.parametrize(
    "config",
    [
        QATConfig(weight_bits=1),
        QATConfig(weight_bits=4, group_size=16),
        QATConfig(weight_bits=2, symmetric=False, per_channel=True),
        QATConfig(activation_bits=4),
        QATConfig(activation_bits=None),
        QATConfig(activation_symmetric=False),
        QATConfig(activation_granularity="tensor", straight_through_estimator="clipped"),
    ],
)
def test_other_bit_widths_run_and_match_plain_form(config):
    lin, layer, x = _pair(config)
    plain = BitLinear.from_linear(copy.deepcopy(lin), config.replace(fused=False))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = layer(x1), plain(x2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    y1.sum().backward()
    y2.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.weight.grad, plain.weight.grad, rtol=1e-5, atol=1e-5)


def test_clipped_ste_masks_weight_gradient_in_fused_path():
    lin = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        lin.weight[0, 0] = 10.0  # far beyond 1.5 gamma: clamped, so no gradient
    layer = BitLinear.from_linear(lin, QATConfig(straight_through_estimator="clipped"))
    layer(torch.randn(4, 32)).sum().backward()
    assert layer.weight.grad[0, 0] == 0
    assert (layer.weight.grad != 0).float().mean() > 0.5


def test_qat_config_defaults_and_validation():
    c = QATConfig()
    assert (c.weight_bits, c.activation_bits, c.per_channel, c.group_size) == (1.58, 8, False, None)
    assert c.weight_spec().granularity == "tensor" and c.activation_spec().granularity == "token"
    assert QATConfig(weight_bits=4.0).weight_bits == 4
    for kwargs, needle in [
        ({"weight_bits": 3.5}, "QATConfig.weight_bits=3.5 is invalid: expected one of 1, 1.58"),
        ({"activation_bits": 6}, "QATConfig.activation_bits=6 is invalid: expected 4, 8 or None"),
        ({"per_channel": True, "group_size": 64}, "QATConfig.group_size=64"),
        ({"group_size": 0}, "QATConfig.group_size=0"),
        ({"straight_through_estimator": "soft"}, "straight_through_estimator='soft'"),
        ({"symmetric": False}, "QATConfig.symmetric=False"),
        ({"fused": "yes"}, "QATConfig.fused='yes'"),
    ]:
        with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")):
            QATConfig(**kwargs)
    with pytest.raises(
        BitNetError, match="'QATConfig.wieght_bits' .did you mean 'QATConfig.weight_bits'"
    ):
        QATConfig(wieght_bits=2)


def test_layers_reading_the_same_input_share_its_codes():
    q = BitLinear(48, 24, bias=False)
    k = BitLinear(48, 16, bias=False)
    x = torch.randn(4, 48, requires_grad=True)
    saved = _saved_activations(lambda: (q(x), k(x)), 4)
    # One int8 code tensor (and one scale per token) kept for both layers' backward.
    assert sum(n for d, n in saved if d == torch.int8) == 2 * 4 * 48  # same tensor saved twice
    codes_q = q(x).grad_fn.saved_tensors[0]
    codes_k = k(x).grad_fn.saved_tensors[0]
    assert codes_q.data_ptr() == codes_k.data_ptr()
    # An in-place change of the input invalidates the shared codes.
    x2 = torch.randn(4, 48)
    y_before = k(x2)
    x2.mul_(3)
    torch.testing.assert_close(k(x2), ref_bitlinear(x2, k.weight), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(k(x2), y_before)


@pytest.mark.parametrize("precision", ["fp32", "bf16-float", "bf16-integer"])
def test_torch_compile_matches_eager(precision, measured):
    pytest.importorskip("torch._inductor")
    measured(precision == "bf16-integer")  # which bf16 GEMM the eager forward measures faster
    lin = nn.Linear(32, 16)
    layer = BitLinear.from_linear(lin)
    x = torch.randn(8, 32)
    compiled = torch.compile(layer, backend="aot_eager")  # traces the graph; no C++ build
    # Traced, the PyTorch quantizer ops and _int_mm run; eager, the native kernels and the
    # measured GEMM kernel: the same bits, both directions. In bf16 the trace runs the GEMM
    # (integer or float) that the eager forward before it measured faster.
    xc, xe = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
        ye = layer(xe)
        yc = compiled(xc)
    assert torch.equal(yc, ye)
    yc.square().sum().backward()
    grads = (xc.grad, layer.weight.grad.clone(), layer.bias.grad.clone())
    layer.zero_grad()
    ye.square().sum().backward()
    for a, b in zip(grads, (xe.grad, layer.weight.grad, layer.bias.grad), strict=True):
        assert torch.equal(a, b)
    # One graph: the kernel choices (native or not, which GEMM) do not break it.
    torch._dynamo.reset()
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0


KERNEL_CHOICES = [
    dict(gemm="int_mm", kernels="torch"),  # the path before any choice existed
    dict(gemm="int_mm", kernels="native"),
    dict(gemm="float", kernels="native"),
    dict(gemm="onednn", kernels="native"),
    dict(gemm="auto", kernels="auto", integer_matmul=True),
]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_gemm_kernel_and_quantizer_kernel_gives_identical_bits(precision):
    """Which kernels run changes the time, never a bit: outputs and all gradients equal the
    torch-ops / _int_mm path exactly, per-tensor and per-channel, with and without bias."""
    from bitnet_training.quant import native

    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    x = torch.randn(3, 11, 96) * 2
    for per_channel in (False, True):
        results = []
        for choice in KERNEL_CHOICES:
            if choice["kernels"] == "native" and native.library() is None:
                continue
            config = QATConfig(per_channel=per_channel, **choice)
            layer = BitLinear.from_linear(copy.deepcopy(lin), config)
            xi = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                y = layer(xi)
            y.float().square().sum().backward()
            results.append((y, xi.grad, layer.weight.grad, layer.bias.grad))
        for other in results[1:]:
            for a, b in zip(results[0], other, strict=True):
                assert a.dtype == b.dtype and torch.equal(a, b)


def test_a_named_gemm_kernel_that_cannot_run_is_refused():
    layer = BitLinear(32, 16, config=QATConfig(gemm="onednn")).double()
    with pytest.raises(ConfigError, match="qat.gemm.*onednn.*float64"):
        layer(torch.randn(4, 32, dtype=torch.float64))


def test_a_graph_still_alive_keeps_its_quantized_weight_when_the_weight_changes():
    """The per-step weight cache rewrites last step's buffers in place only when nothing
    holds them: a forward whose backward has not run yet keeps its own."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    layer = BitLinear.from_linear(copy.deepcopy(lin), QATConfig())
    x = torch.randn(8, 64)
    y1 = layer(x)  # its graph saves this step's quantized weight
    with torch.no_grad():
        layer.weight.mul_(-1.7)  # a new step's weight: the cache is rebuilt
    y2 = layer(x)
    g = torch.randn_like(y1)
    y1.backward(g)
    ref = BitLinear.from_linear(copy.deepcopy(lin), QATConfig(cache_quantized_weight=False))
    xr = x.clone().requires_grad_()
    y_ref = ref(xr)
    y_ref.backward(g)
    assert torch.equal(y1, y_ref) and torch.equal(layer.weight.grad, ref.weight.grad)
    with torch.no_grad():
        ref.weight.mul_(-1.7)
    assert torch.equal(y2, ref(x))


def test_inference_mode_forwards_then_training_steps():
    """Generation under torch.inference_mode between training steps: its cached weight and
    shared activation codes are inference tensors, which a training forward must not use."""
    torch.manual_seed(0)
    layer = BitLinear(64, 32)
    x = torch.randn(4, 64)
    for _ in range(2):
        with torch.inference_mode():
            y_inf = layer(x)
        y = layer(x)  # the same tensor object: the shared-codes lookup sees it again
        y.square().sum().backward()
        assert torch.equal(y_inf, y.detach())
        with torch.no_grad():
            layer.weight.add_(0.01)  # the next step's weight


def test_weights_saved_under_saved_tensor_hooks_are_never_overwritten():
    """A hook (save_on_cpu, offloading) may keep the very w_q object, which reference counts
    cannot see: a graph built under one keeps its quantized weight across new steps."""
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    ours = BitLinear.from_linear(copy.deepcopy(lin), QATConfig())
    ref = BitLinear.from_linear(
        copy.deepcopy(lin), QATConfig(kernels="torch", gemm="int_mm", cache_quantized_weight=False)
    )
    x2 = torch.randn(8, 32)
    results = []
    for layer in (ours, ref):
        x = torch.ones(8, 32).requires_grad_()  # its gradient reads the saved w_q
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            loss = layer(x).square().mean()
        for _ in range(2):  # two new steps' weights, each quantized and used
            with torch.no_grad():
                layer.weight.mul_(1.3)
            layer(x2)
        loss.backward()
        results.append((loss, x.grad, layer.weight.grad))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.fixture
def measured(monkeypatch):
    """Pin what `gemm.integer_path` measures: `measured(True)` makes the integer GEMM the
    faster, `measured(False)` the float GEMM of x_q; returns the list of shapes measured."""
    from bitnet_training.quant import gemm

    calls = []

    def pin(integer: bool):
        monkeypatch.setattr(gemm, "_PATHS", {})
        monkeypatch.setattr(
            gemm, "_measure_path", lambda kernel, n, k, m, *rest: calls.append((k, m)) or integer
        )
        return calls

    return pin


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_runs_the_float_gemm_of_the_quantized_values(dtype, measured):
    """integer_matmul=auto in bf16 / fp16 where the float GEMM measured faster (fp16 always:
    no integer kernel): y = linear(x_q, w_q) in that dtype, x_q = codes / s rounded once (the
    quantizer's own pass natively, PyTorch ops otherwise: same bits), the same x_q in the
    backward; equal to integer_matmul=False, and to the reference's formula up to the dtype's
    rounding."""
    from bitnet_training.nn.bitlinear import measures_path

    assert measures_path(QATConfig(), dtype) == (dtype == torch.bfloat16)
    assert not measures_path(QATConfig(), torch.float32)  # integer
    assert not measures_path(QATConfig(gemm="int_mm"), dtype)  # a named kernel: integer
    assert not measures_path(QATConfig(integer_matmul=False), dtype)
    shapes = measured(False)
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    x = torch.randn(3, 11, 96) * 2
    results = []
    for config in (
        QATConfig(),
        QATConfig(kernels="torch"),
        QATConfig(integer_matmul=False),
        QATConfig(integer_matmul=False, kernels="torch"),
    ):
        layer = BitLinear.from_linear(copy.deepcopy(lin), config)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=dtype):
            y = layer(xi)
            if not results:  # what the layer computes, written out
                xf = x.reshape(-1, 96)
                inv = 127 / xf.abs().amax(-1, keepdim=True).clamp(min=1e-5)
                x_q = (xf * inv).round().to(torch.int8).div(inv).to(dtype)
                w_q = dequantize(ternary_quantize(lin.weight.detach()), torch.float32).to(dtype)
                assert torch.equal(y.reshape(-1, 40), F.linear(x_q, w_q, lin.bias.to(dtype)))
        y.float().square().sum().backward()
        results.append((y, xi.grad, layer.weight.grad, layer.bias.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)
    with torch.autocast("cpu", dtype=dtype):
        y_ref = ref_bitlinear(x, lin.weight, lin.bias)
    torch.testing.assert_close(results[0][0].float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    # Measured once per shape (bf16); fp16 has no integer kernel to measure against.
    assert shapes == ([(96, 40)] if dtype == torch.bfloat16 else [])


def test_bf16_runs_the_integer_gemm_where_it_measured_faster(measured):
    """integer_matmul=auto in bf16 where the integer GEMM measured faster: the same bits as
    integer_matmul=True, forward and backward, and the codes (not x_q) saved; a layer with
    another shape is measured for itself, a layer of the same shape is not."""
    shapes = measured(True)
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    x = torch.randn(3, 11, 96) * 2
    results = []
    for config in (QATConfig(), QATConfig(integer_matmul=True), QATConfig(integer_matmul=False)):
        layer = BitLinear.from_linear(copy.deepcopy(lin), config)
        xi = x.clone().requires_grad_()
        saved = []
        with (
            torch.autocast("cpu", dtype=torch.bfloat16),
            torch.autograd.graph.saved_tensors_hooks(
                lambda t, s=saved: s.append(t) or t, lambda t: t
            ),
        ):
            y = layer(xi)
        y.float().square().sum().backward()
        results.append((y, xi.grad, layer.weight.grad, saved[0].dtype))
    auto, integer, floating = results
    for a, b in zip(auto, integer, strict=True):
        assert a == b if isinstance(a, torch.dtype) else torch.equal(a, b)
    assert auto[3] == torch.int8 and floating[3] == torch.bfloat16
    assert not torch.equal(auto[0], floating[0])  # a different rounding: not the same numbers
    assert shapes == [(96, 40)]
    BitLinear(96, 40)(torch.randn(4, 96).bfloat16())
    BitLinear(40, 96)(torch.randn(4, 40).bfloat16())
    assert shapes == [(96, 40), (40, 96)]


@pytest.mark.parametrize("per_channel", [False, True])
def test_fp16_small_tokens_keep_their_values(per_channel):
    """The scale s = 127 / max|x| of a token with max |x| below 2e-3 is above fp16's range: x_q
    is computed with s in float32, then rounded to fp16, so every token's output stays within
    fp16 rounding of the float32 one, forward and backward (a scale rounded to fp16 first
    would be inf; an integer sum rounded to fp16 would overflow or underflow). An integer
    GEMM is never run in fp16, and naming one there is refused."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 16, bias=False)
    x = torch.randn(4, 64) * torch.tensor([[1.0], [1e-3], [1e-4], [1e-5]])
    want = BitLinear.from_linear(copy.deepcopy(lin), QATConfig(per_channel=per_channel))
    xw = x.clone().requires_grad_()
    y32 = want(xw)
    y32.sum().backward()
    for extra in ({}, {"integer_matmul": True}, {"kernels": "torch"}):
        config = QATConfig(per_channel=per_channel, **extra)
        layer = BitLinear.from_linear(copy.deepcopy(lin), config)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.float16):
            y = layer(xi)
        y.float().sum().backward()
        err = (y.float() - y32).abs().amax(1) / y32.abs().amax(1)
        assert (err < 1e-2).all(), (extra, err)  # each token, the smallest included
        assert torch.allclose(xi.grad, xw.grad, rtol=1e-2, atol=1e-3)
        torch.testing.assert_close(layer.weight.grad, want.weight.grad, rtol=1e-2, atol=1e-4)
    layer = BitLinear.from_linear(copy.deepcopy(lin), QATConfig(gemm="int_mm"))
    fp16 = torch.autocast("cpu", dtype=torch.float16)
    with pytest.raises(ConfigError, match="qat.gemm.*float16 cannot hold"), fp16:
        layer(x)


def test_shared_float_copies_are_released_once_the_backward_starts():
    """q / k / v share one x_q in the forward; with codes saved it is not kept through the
    backward."""
    from bitnet_training.nn.bitlinear import _ACT_CODES

    codes = QATConfig(saved_activations="codes", integer_matmul=False)  # the float GEMM of x_q
    q, k = BitLinear(48, 24, bias=False, config=codes), BitLinear(48, 16, bias=False, config=codes)
    x = torch.randn(4, 48, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = q(x).float().sum() + k(x).float().sum()
    assert ("x_q", torch.bfloat16) in _ACT_CODES.lookup(x, 8)[2]
    y.backward()
    assert _ACT_CODES.lookup(x, 8)[2] == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("integer", [False, True], ids=["float-gemm", "integer-gemm"])
def test_saved_codes_or_values_give_the_same_bits(dtype, integer):
    """saved_activations: int8 codes and a float32 scale per token (x_q rebuilt in the
    backward), or x_q itself in the compute dtype; auto saves values in bf16 / fp16 with the
    float GEMM (where x_q is already made), codes otherwise. Outputs and gradients are the
    same bits whichever is saved."""
    if integer and dtype == torch.float16:
        pytest.skip("no integer GEMM in float16")
    torch.manual_seed(0)
    lin = nn.Linear(96, 40)
    x = torch.randn(3, 11, 96) * 2
    low = dtype != torch.float32
    results, saved = {}, {}
    for mode in ("codes", "values", "auto"):
        config = QATConfig(saved_activations=mode, integer_matmul=integer)
        layer = BitLinear.from_linear(copy.deepcopy(lin), config)
        xi = x.clone().requires_grad_()

        def forward(layer=layer, xi=xi):
            with torch.autocast("cpu", dtype=dtype, enabled=low):
                return layer(xi)

        saved[mode] = sorted(_saved_activations(forward, 33), key=str)
        y = forward()
        y.float().square().sum().backward()
        results[mode] = (y, xi.grad, layer.weight.grad, layer.bias.grad)
    assert saved["codes"] == sorted([(torch.int8, 33 * 96), (torch.float32, 33 * 4)], key=str)
    assert saved["values"] == [(dtype, 33 * 96 * dtype.itemsize)]
    assert saved["auto"] == saved["values" if low and not integer else "codes"]
    for mode in ("values", "auto"):
        for a, b in zip(results["codes"], results[mode], strict=True):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_an_input_used_again_after_its_backward_is_quantized_again():
    """bf16 with x_q saved: no codes are kept, and the backward releases the shared x_q, so
    the same input (same version) in a later step is quantized again, to the same values;
    a layer needing codes after one that made none quantizes it again too."""
    layer = BitLinear(48, 24, config=QATConfig(integer_matmul=False))  # the float GEMM of x_q
    x = torch.randn(4, 48, requires_grad=True)
    grads = []
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().sum().backward()
        grads.append((y, layer.weight.grad, x.grad))
        layer.weight.grad = x.grad = None
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    k = BitLinear(48, 16, config=QATConfig(integer_matmul=True))
    alone = copy.deepcopy(k)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)  # shares x_q, no codes
        assert torch.equal(k(x), alone(x.clone()))


@pytest.mark.parametrize("saved", ["auto", "codes", "values"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_frozen_weight_keeps_no_activations(saved, dtype):
    """Only the weight gradient reads the saved activations: a frozen layer (a PEFT base)
    saves none of them, and its input gradient is unchanged."""
    torch.manual_seed(0)
    lin = nn.Linear(96, 40, bias=False)
    x = torch.randn(33, 96)
    grads = []
    for frozen in (False, True):
        layer = BitLinear.from_linear(copy.deepcopy(lin), QATConfig(saved_activations=saved))
        layer.weight.requires_grad_(not frozen)
        xi = x.clone().requires_grad_()

        def forward(layer=layer, xi=xi):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                return layer(xi)

        kept = _saved_activations(forward, 33)
        assert (kept == []) == frozen
        forward().float().square().sum().backward()
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1])
