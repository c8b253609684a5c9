"""Distillation: each term against a hand computation, zero when the student is the teacher,
a frozen teacher that gets no gradient, evaluation on the plain loss, and the CLI."""

import copy
import math

import pytest
import torch

from bitnet_training import BitNetError, BitNetLM, ModelConfig
from bitnet_training.loss import DistillConfig, DistillLoss, LMLoss, LossConfig, relation_kl
from bitnet_training.train import Trainer, TrainingConfig

CFG = ModelConfig(
    vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)  # fmt: skip


def model(seed=0, **kw):
    torch.manual_seed(seed)
    return BitNetLM(CFG.model_copy(update=kw) if kw else CFG)


def batch(seed=1):
    x = torch.randint(0, 60, (2, 10), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": x, "labels": x}


def only(**weights):
    base = dict(ce_weight=0.0, logit_weight=0.0, hidden_weight=0.0, relation_weight=0.0)
    return LossConfig(distill=DistillConfig(**{**base, **weights}))


def test_logit_kl_by_hand():
    teacher, student = model(0), model(1)
    loss = DistillLoss(teacher, only(logit_weight=1.0, temperature=2.0))
    b = batch()
    got = loss(student.train(), b)
    with torch.no_grad():  # by hand in float64, from the same float32 logits
        s = student(b["input_ids"]).logits[:, :-1].reshape(-1, 60).double() / 2
        t = teacher(b["input_ids"]).logits[:, :-1].reshape(-1, 60).double() / 2
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    want = (p * (p.log() - q.log())).sum(-1).mean() * 4  # T^2
    # KL (~2e-3 a token) is a difference of float32 log-probabilities of size ~log(60):
    # each carries ~2.5e-7 of rounding, so the loss is good to ~1e-6 absolute, not 1e-5
    # relative (an AMD EPYC's float32 kernels gave 7e-6 relative). A reversed KL moves it by
    # 1.2e-5, a missing T^2 or an unscaled temperature by far more.
    assert got.item() == pytest.approx(want.item(), abs=1e-6)


def test_relation_kl_by_hand():
    torch.manual_seed(0)
    t, s = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
    # two relation heads of width 2: R = softmax(x x^T / sqrt(2)) per head
    want = 0.0
    for h in range(2):
        xt, xs = t[0, :, 2 * h : 2 * h + 2], s[0, :, 2 * h : 2 * h + 2]
        rt = torch.softmax(xt @ xt.T / math.sqrt(2), -1)
        rs = torch.softmax(xs @ xs.T / math.sqrt(2), -1)
        want += (rt * (rt.log() - rs.log())).sum(-1).mean().item() / 2
    assert relation_kl(t, s, heads=2).item() == pytest.approx(want, rel=1e-5)
    assert relation_kl(t, t, heads=2).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(BitNetError, match="does not split into 3 relation heads"):
        relation_kl(t, s, heads=3)


def test_every_term_is_zero_when_the_student_is_the_teacher():
    teacher = model(0)
    student = copy.deepcopy(teacher).train()
    loss = DistillLoss(teacher, only(logit_weight=10.0, hidden_weight=1.0, relation_weight=1e5))
    assert loss(student, batch()).item() == pytest.approx(0.0, abs=1e-4)
    # and not zero for another student: the relation term alone is sensitive
    other = DistillLoss(teacher, only(relation_weight=1.0))
    assert other(model(3).train(), batch()).item() > 1e-4


def test_the_teacher_is_frozen_and_evaluation_uses_the_plain_loss(tmp_path):
    teacher = model(0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss = DistillLoss(teacher, LossConfig(label_smoothing=0.1))
    student = model(1)

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {k: v[0] for k, v in batch(i).items()}

    cfg = TrainingConfig(output_dir=str(tmp_path), max_steps=3, batch_size=2,
                         mixed_precision="fp32", learning_rate=1e-2, log_every=1)  # fmt: skip
    Trainer(student, cfg, Data(), Data(), loss_fn=loss).train()
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    student.eval()
    plain = LMLoss()(student, batch())
    assert torch.equal(loss(student, batch()), plain)  # no teacher, no smoothing in eval
    assert torch.equal(plain, student(**batch()).loss)


def test_chunked_lm_loss_through_the_model_equals_the_plain_one():
    m = model(0).train()
    b = batch()
    plain = LMLoss()(m, b)
    chunked = LMLoss(LossConfig(chunk_size=7))(m, b)
    torch.testing.assert_close(chunked, plain, rtol=1e-6, atol=1e-6)
    g1 = torch.autograd.grad(plain, m.lm_head.weight)[0]
    g2 = torch.autograd.grad(LMLoss(LossConfig(chunk_size=7))(m, b), m.lm_head.weight)[0]
    torch.testing.assert_close(g2, g1, rtol=1e-5, atol=1e-6)
    assert type(m.lm_head) is torch.nn.Linear  # the head is back in place


def test_bad_settings_are_one_line_errors():
    with pytest.raises(
        BitNetError, match="the teacher's vocabulary has 60 tokens, the student's 61"
    ):
        DistillLoss(model(0), LossConfig()).check_student(model(1, vocab_size=61))
    with pytest.raises(BitNetError, match="loss.chunk_size cannot apply with logits"):
        DistillLoss(model(0), LossConfig(chunk_size=8))
    with pytest.raises(BitNetError, match="relation_layer=5 is out of range"):
        DistillLoss(model(0), LossConfig(distill=DistillConfig(relation_layer=5)))
    with pytest.raises(BitNetError, match="ce_weight"):
        only()
    from bitnet_training.config import load_config

    with pytest.raises(BitNetError, match="loss.distill.temperature=2.0 has no effect here"):
        load_config(None, ["loss.distill.temperature=2"])


def test_relations_are_float32_under_bf16_autocast():
    torch.manual_seed(0)
    t, s = torch.randn(2, 16, 8), torch.randn(2, 16, 8)
    s = t + 0.01 * s  # nearly equal: a small KL that bf16 would round away or below zero
    exact = relation_kl(t.double(), s.double(), heads=2).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = relation_kl(t, s, heads=2).item()
    assert got == pytest.approx(exact, rel=1e-3)
