"""L1 / L2 penalties (added once per step through aux_loss) and dropout settings."""

import pytest
import torch

from bitnet_training import BitNetError, BitNetLM, ModelConfig
from bitnet_training.loss import Penalty
from bitnet_training.train import Trainer, TrainingConfig

CFG = ModelConfig(
    vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
)  # fmt: skip


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        x = torch.randint(0, 40, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x}


def test_penalty_value_by_hand_and_through_the_trainer(tmp_path):
    torch.manual_seed(0)
    m = BitNetLM(CFG)
    pen = Penalty(l1=1e-3, l2=1e-2, patterns=["*q_proj.weight"])

    class T:
        model = m

    pen.setup(T)
    w = m.model.layers[0].self_attn.q_proj.weight
    want = 1e-3 * w.abs().sum() + 1e-2 * (w**2).sum()
    torch.testing.assert_close(pen.aux_loss(None), want)
    cfg = TrainingConfig(output_dir=str(tmp_path), max_steps=1, batch_size=2,
                         mixed_precision="fp32", log_every=1, gradient_clip_norm=None)  # fmt: skip
    torch.manual_seed(0)
    plain = Trainer(BitNetLM(CFG), cfg, Data()).train().history[0]["loss"]
    torch.manual_seed(0)
    cfg2 = cfg.model_copy(update={"output_dir": str(tmp_path / "p")})
    penalized = Trainer(BitNetLM(CFG), cfg2, Data(), callbacks=[pen]).train().history[0]["loss"]
    assert penalized == pytest.approx(plain + float(want), rel=1e-5)
    with pytest.raises(BitNetError, match="matches no trainable parameter"):
        Penalty(l2=1.0, patterns=["nothing*"]).setup(T)
    with pytest.raises(BitNetError, match="one of them > 0"):
        Penalty()


def test_dropout_is_off_by_default_and_only_in_training():
    x = torch.randint(0, 40, (2, 10))
    torch.manual_seed(0)
    plain = BitNetLM(CFG)
    torch.manual_seed(0)
    drop = BitNetLM(CFG.model_copy(update={"attention_dropout": 0.5, "residual_dropout": 0.5}))
    drop.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert torch.equal(plain.train()(x).logits, plain.eval()(x).logits)  # off: no effect
        assert torch.equal(drop.eval()(x).logits, plain.eval()(x).logits)  # eval: none
        assert not torch.equal(drop.train()(x).logits, plain.eval()(x).logits)
