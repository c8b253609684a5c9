"""Run by tests/distributed/test_layouts.py, alone or under torchrun: train a tiny ternary
BitNetLM in float64 with the Trainer under a parallel layout (argv[1]: none, ddp, fsdp,
fsdp-packed, tp, pp (1F1B), pp-gpipe, or fsdp+tp over 4 ranks; argv[2]: the output
directory; argv[3]: the per-rank batch size; argv[4], optional: a checkpoint to resume
from), and write each step's loss and gradient norm and the final ternary codes of every
BitLinear to <output>/result.pt (rank 0)."""

import os
import sys

import torch

from bitnet_training.distributed.config import DistributedConfig
from bitnet_training.distributed.ddp import init_from_env, wrap_ddp
from bitnet_training.distributed.fsdp import apply_fsdp
from bitnet_training.distributed.layout import apply_layout
from bitnet_training.distributed.pp import apply_pipeline
from bitnet_training.models import BitNetLM
from bitnet_training.models.config import ModelConfig
from bitnet_training.nn import quantize_model
from bitnet_training.nn.bitlinear import BitLinear
from bitnet_training.quant.config import QATConfig
from bitnet_training.train import Callback, CheckpointIO, Trainer, TrainingConfig


class Record(Callback):
    key = "record"

    def __init__(self):
        self.rows = []

    def on_step_end(self, trainer):
        s = trainer.last_step
        self.rows.append((float(trainer.mean_over_ranks(s["loss"])), float(s["grad_norm"])))


def main(layout: str, out: str, batch: int, resume: str | None) -> None:
    torch.set_default_dtype(torch.float64)
    cpu = torch.device("cpu")
    init_from_env("gloo", cpu)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = BitNetLM(cfg)
    # Tensor parallel layers take BitLinear's unfused path; its baseline does too (fused and
    # unfused agree to float64 rounding, which a layout comparison should not depend on).
    qat = QATConfig(fused=os.environ.get("BITNET_FUSED", "1") == "1")
    quantize_model(model, qat)
    if layout == "ddp":
        model = wrap_ddp(model, cpu)
    elif layout in ("fsdp", "fsdp-packed"):  # weights gathered as 2-bit codes, or not
        model = apply_fsdp(model, cpu, ternary_all_gather=layout == "fsdp-packed")
    elif layout in ("pp", "pp-gpipe"):  # two stages, two micro-batches per batch
        model = apply_pipeline(model, cpu, "gpipe" if layout == "pp-gpipe" else "1f1b", 2)
    elif layout in ("tp", "fsdp+tp"):  # tensor parallel in groups of 2
        d = DistributedConfig(strategy=layout, tp_size=2)
        model = apply_layout(model, d, cpu)[0]
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 48, (32, 16), generator=gen)
    lengths = torch.randint(6, 17, (32,), generator=gen)  # unequal targets per rank
    labels = ids.masked_fill(torch.arange(16) >= lengths[:, None], -100)
    data = [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels, strict=True)]
    config = TrainingConfig(
        output_dir=out, batch_size=batch, gradient_accumulation_steps=2, max_steps=4,
        learning_rate=3e-2, gradient_clip_norm=0.5, agc_clip_factor=0.2, save_every=2,
        eval_every=2, log_every=100, mixed_precision="fp32",
    )  # fmt: skip
    record = Record()
    io = CheckpointIO(sharded=layout not in ("none", "ddp"))
    trainer = Trainer(model, config, data, data[:12], [record], checkpoint_io=io)
    trainer.train(resume_from=resume)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if layout.startswith("pp"):  # each stage's own weights, gathered on rank 0
        parts = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, model.state_dict())
        full = {k: v for part in parts for k, v in part.items()}
    else:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    codes = {}
    plain = BitNetLM(cfg)
    quantize_model(plain, qat)
    plain.load_state_dict(full)
    for name, m in plain.named_modules():
        if isinstance(m, BitLinear):
            codes[name] = m._quantize_weight(torch.float64)[2].codes
    evals = [h for h in trainer.history if h["kind"] == "eval"]
    if trainer.rank == 0:
        torch.save(
            {"steps": record.rows, "codes": codes, "evals": [e["val_loss"] for e in evals]},
            os.path.join(out, "result.pt"),
        )
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        os._exit(0)  # as the CLI: no interpreter teardown, where gloo was seen to abort


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] if len(sys.argv) > 4 else None)
