"""Evaluation metrics: token accuracy and user-registered functions against hand counts,
streaming over batches, named by training.metrics and usable as training.best_metric."""

import pytest
import torch

from bitnet_training import BitNetError, BitNetLM, ModelConfig
from bitnet_training.metrics import TokenAccuracy, build_metrics, register_metric
from bitnet_training.train import Trainer, TrainingConfig

CFG = ModelConfig(
    vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
)  # fmt: skip


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        x = torch.randint(0, 40, (12,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x}


def test_token_accuracy_by_hand():
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 2] = logits[0, 1, 0] = logits[0, 2, 1] = 1.0  # predictions 2, 0, 1
    labels = torch.tensor([[9, 2, 1, -100]])  # targets 2, 1, (ignored)
    m = TokenAccuracy()
    m.reset()
    m.update({"labels": labels}, None, None, logits=logits)
    m.update({"labels": labels}, None, None, logits=logits)
    assert m.compute(None) == {"val_token_accuracy": 0.5}  # 1 of 2, twice


def test_metrics_named_in_the_config_are_computed_and_can_be_best(tmp_path):
    torch.manual_seed(0)
    model = BitNetLM(CFG)
    register_metric("top1_hits", lambda logits, labels: (
        (logits[:, :-1].argmax(-1) == labels[:, 1:]).sum(), labels[:, 1:].numel()))  # fmt: skip
    cfg = TrainingConfig(
        output_dir=str(tmp_path), max_steps=2, batch_size=2, mixed_precision="fp32",
        metrics=["token_accuracy", "top1_hits"], best_metric="val_token_accuracy",
    )  # fmt: skip
    trainer = Trainer(model, cfg, Data(), Data())
    m = trainer.evaluate()
    assert 0 <= m["val_token_accuracy"] <= 1
    assert m["val_top1_hits"] == pytest.approx(m["val_token_accuracy"])  # no ignored labels
    # by hand over the whole evaluation set
    hits = total = 0
    with torch.no_grad():
        for i in range(6):
            x = Data()[i]["input_ids"][None]
            hits += int((model(x).logits[:, :-1].argmax(-1) == x[:, 1:]).sum())
            total += 11
    assert m["val_token_accuracy"] == pytest.approx(hits / total)
    result = Trainer(model, cfg.model_copy(update={"output_dir": str(tmp_path / "b")}),
                     Data(), Data()).train()  # fmt: skip
    assert result.best_checkpoint is not None
    assert TrainingConfig(best_metric="val_token_accuracy").best_direction == "max"  # auto
    assert TrainingConfig().best_direction == "min"


def test_unknown_metrics_and_bad_best_metric_are_one_line_errors(tmp_path):
    with pytest.raises(BitNetError, match="unknown metric 'bleu'; known: loss, token_accuracy"):
        build_metrics(["bleu"])
    cfg = TrainingConfig(output_dir=str(tmp_path), best_metric="val_token_accuracy")
    with pytest.raises(BitNetError, match="best_metric='val_token_accuracy' is not an evaluation"):
        Trainer(BitNetLM(CFG), cfg, Data(), Data())
    with pytest.raises(BitNetError, match="already registered"):
        register_metric("token_accuracy", lambda a, b: (0, 1))
