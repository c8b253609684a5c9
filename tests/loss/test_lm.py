"""Language-modelling losses against hand-computed values and PyTorch's own cross-entropy;
the chunked form equals the plain one in value and gradient."""

import math

import pytest
import torch
import torch.nn.functional as F

from bitnet_training import BitNetError
from bitnet_training.loss import causal_lm_loss, chunked_causal_lm_loss


def test_plain_loss_by_hand():
    # One sequence of 3 tokens, vocabulary 2: positions 0 and 1 predict labels 1 and 2.
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [9.0, 9.0]]])
    labels = torch.tensor([[5, 1, 0]])
    # position 0 -> target 1: -log(1/2); position 1 -> target 0: -log(e^2 / (e^2 + 1))
    want = (math.log(2) + math.log1p(math.exp(-2))) / 2
    assert causal_lm_loss(logits, labels).item() == pytest.approx(want, rel=1e-6)
    # ignored targets are not counted
    ignored = torch.tensor([[5, -100, 0]])
    assert causal_lm_loss(logits, ignored).item() == pytest.approx(
        math.log1p(math.exp(-2)), rel=1e-6
    )
    # z-loss: + z * mean(logsumexp^2) = z * (log(2)^2 + log(e^2 + 1)^2) / 2
    z = 1e-2
    lse = [math.log(2), math.log(math.exp(2) + 1)]
    got = causal_lm_loss(logits, labels, z_loss=z).item()
    assert got == pytest.approx(want + z * (lse[0] ** 2 + lse[1] ** 2) / 2, rel=1e-6)
    # label smoothing eps: (1 - eps) * NLL + eps * mean over classes of -log p
    eps = 0.1
    p1 = torch.log_softmax(torch.tensor([2.0, 0.0]), -1)
    smooth = ((1 - eps) * math.log(2) + eps * math.log(2)) + (
        (1 - eps) * -p1[0].item() + eps * -p1.mean().item()
    )
    assert causal_lm_loss(logits, labels, label_smoothing=eps).item() == pytest.approx(
        smooth / 2, rel=1e-6
    )


def test_plain_loss_equals_the_models_own():
    from bitnet_training import BitNetLM, ModelConfig

    torch.manual_seed(0)
    m = BitNetLM(ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=1, num_attention_heads=4))  # fmt: skip
    x = torch.randint(0, 50, (2, 9))
    out = m(x, labels=x)
    assert torch.equal(causal_lm_loss(out.logits, x), out.loss)


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_plain_in_value_and_gradient(chunk, bias):
    torch.manual_seed(0)
    h = torch.randn(3, 7, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, dtype=torch.float64, requires_grad=True) if bias else None
    labels = torch.randint(0, 40, (3, 7))
    labels[0, 3] = -100
    kw = dict(label_smoothing=0.1, z_loss=1e-3)
    plain = causal_lm_loss(F.linear(h, w, b), labels, **kw)
    grads = torch.autograd.grad(plain, [t for t in (h, w, b) if t is not None])
    chunked = chunked_causal_lm_loss(h, w, labels, bias=b, chunk_size=chunk, **kw)
    cgrads = torch.autograd.grad(chunked, [t for t in (h, w, b) if t is not None])
    torch.testing.assert_close(chunked, plain.float(), rtol=1e-6, atol=1e-6)
    for g, c in zip(grads, cgrads, strict=True):
        torch.testing.assert_close(c, g, rtol=1e-6, atol=1e-7)


def test_chunked_under_bf16_autocast_matches_the_plain_head():
    torch.manual_seed(1)
    h = torch.randn(2, 9, 32, requires_grad=True)
    w = torch.randn(100, 32, requires_grad=True)
    labels = torch.randint(0, 100, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = causal_lm_loss(F.linear(h, w), labels)
        chunked = chunked_causal_lm_loss(h, w, labels, chunk_size=4)
    torch.testing.assert_close(chunked, plain, rtol=1e-3, atol=1e-3)
    gp = torch.autograd.grad(plain, w)[0]
    gc = torch.autograd.grad(chunked, w)[0]
    torch.testing.assert_close(gc, gp, rtol=2e-2, atol=2e-3)


def test_bad_arguments_are_one_line_errors():
    h, w, y = torch.randn(1, 4, 8), torch.randn(10, 8), torch.zeros(1, 4, dtype=torch.long)
    for kw, msg in [
        (dict(label_smoothing=1.0), "label_smoothing=1.0 is invalid"),
        (dict(z_loss=-1.0), "z_loss=-1.0 is invalid"),
        (dict(chunk_size=0), "chunk_size=0 is invalid"),
    ]:
        with pytest.raises(BitNetError, match=msg):
            chunked_causal_lm_loss(h, w, y, **kw)
    with pytest.raises(BitNetError, match="do not fit"):
        chunked_causal_lm_loss(h, torch.randn(10, 9), y)
    with pytest.raises(BitNetError, match="disagree on"):
        causal_lm_loss(torch.randn(1, 5, 10), y)
