"""Activation checkpointing: equal gradients with and without, names unchanged."""

import pytest
import torch

from bitnet_training import BitNetError, BitNetLM, ModelConfig, QATConfig
from bitnet_training.distributed import apply_activation_checkpointing

CFG = ModelConfig(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def grads(checkpointed: bool, qat: QATConfig):
    torch.manual_seed(0)
    model = BitNetLM.bitnet(CFG, qat)
    if checkpointed:
        assert apply_activation_checkpointing(model) == 2
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)  # quantization noise draws from here
    model(ids, labels=ids).loss.backward()
    return model, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("qat", [QATConfig(), QATConfig(quant_noise=0.5)])
def test_gradients_equal_with_and_without(qat):
    plain, a = grads(False, qat)
    ckpt, b = grads(True, qat)
    assert list(a) == list(b)  # parameter names unchanged
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert list(plain.state_dict()) == list(ckpt.state_dict())


def test_a_model_without_blocks_is_refused():
    with pytest.raises(BitNetError, match="no transformer blocks"):
        apply_activation_checkpointing(torch.nn.Sequential(torch.nn.Linear(2, 2)))
