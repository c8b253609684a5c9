import os

# The CUDA activation quantizer's Triton kernel runs in Triton's CPU interpreter in these
# tests (tests/quant/test_triton_kernels.py). Triton reads this once, when it is first
# imported, and torch.compile's inductor imports it: so it is set before anything runs.
# With BITNET_TRAINING_TEST_CUDA=1 (a machine with a GPU) those tests run compiled on it.
if os.environ.get("BITNET_TRAINING_TEST_CUDA") != "1":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# A model small enough that a training step takes milliseconds.
MICRO_MODEL = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=128,
)


@pytest.fixture
def micro_model():
    from bitnet_training import BitNetLM, ModelConfig, QATConfig, quantize_model

    def make(qat=True, seed=0):
        torch.manual_seed(seed)
        model = BitNetLM(ModelConfig(**MICRO_MODEL))
        if qat:
            quantize_model(model, QATConfig() if qat is True else qat)
        return model

    return make


@pytest.fixture
def token_windows():
    from bitnet_training.data import TokenWindowDataset

    def make(n_windows=24, seq_len=16, seed=1):
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, 256, (n_windows * (seq_len - 1) + 1,), generator=g)
        return TokenWindowDataset(tokens.int(), seq_len, bytes_per_token=1.0)

    return make


@pytest.fixture(autouse=True)
def _fresh_matmul_paths(monkeypatch):
    """Each test measures its own bf16 integer-or-float GEMM decisions (a process's are
    kept): none carries over from an earlier test, so no result depends on test order."""
    from bitnet_training.quant import gemm

    monkeypatch.setattr(gemm, "_PATHS", {})
