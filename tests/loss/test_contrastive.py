"""Contrastive fine-tuning: InfoNCE against a hand computation, pooling that padding cannot
change, the paired-text source, and a CLI run whose loss falls."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from bitnet_training import BitNetError, BitNetLM, ModelConfig
from bitnet_training.cli import main
from bitnet_training.data.pairs import PairedTextDataset
from bitnet_training.data.tokenizer import ByteTokenizer
from bitnet_training.loss import info_nce, pool
from bitnet_training.loss.contrastive import embed

CFG = ModelConfig(
    vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
)  # fmt: skip


def test_info_nce_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    p = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    qn, pn = F.normalize(q, dim=-1), F.normalize(p, dim=-1)
    s = qn @ pn.T / 0.5
    one_way = -(torch.log_softmax(s, 1).diagonal()).mean()
    other = -(torch.log_softmax(s.T, 1).diagonal()).mean()
    assert info_nce(q, p, 0.5, symmetric=False).item() == pytest.approx(one_way.item(), rel=1e-6)
    assert info_nce(q, p, 0.5).item() == pytest.approx((one_way + other).item() / 2, rel=1e-6)
    with pytest.raises(BitNetError, match="must both be"):
        info_nce(q, p[:1])


def test_pooling_ignores_right_padding():
    torch.manual_seed(0)
    m = BitNetLM(CFG).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0, 0]])
    n = torch.tensor([3])
    with torch.no_grad():
        padded = embed(m, ids, n)
        alone = embed(m, ids[:, :3], n)
        last = embed(m, ids, n, "last")
    torch.testing.assert_close(padded, alone)
    h = torch.arange(12.0).view(1, 4, 3)
    assert torch.equal(pool(h, torch.tensor([2])), h[:, :2].mean(1))
    assert last.shape == (1, 32)


def write_pairs(path, n=24):
    words = ["cat", "dog", "fish", "bird", "tree", "rock", "star", "moon"]
    rows = [{"query": f"the {words[i % 8]} {i}", "positive": f"a {words[i % 8]} number {i}"}
            for i in range(n)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_paired_text_is_checked(tmp_path):
    tok = ByteTokenizer()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"query": "a"}\n')
    with pytest.raises(BitNetError, match="line 1 needs non-empty string 'query' and 'positive'"):
        PairedTextDataset([str(bad)], tok, 16)
    one = tmp_path / "one.jsonl"
    one.write_text('{"query": "a", "positive": "b"}\n')
    with pytest.raises(BitNetError, match="has 1 pairs"):
        PairedTextDataset([str(one)], tok, 16)
    ds = PairedTextDataset([str(write_pairs(tmp_path / "p.jsonl"))], tok, 16)
    item = ds[0]
    assert item["query_ids"].shape == (16,) and 0 < int(item["query_len"]) <= 16


def test_contrastive_training_from_the_cli(tmp_path, capsys):
    pairs = write_pairs(tmp_path / "pairs.jsonl")
    out = tmp_path / "run"
    args = ["train", "--no-progress", "loss.objective=contrastive", "data.source=pairs",
            f"data.train_files={pairs}", f"data.val_files={pairs}", "data.seq_len=24",
            "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=1",
            "model.num_attention_heads=2", "model.num_key_value_heads=1", "quantize=false",
            "training.batch_size=8", "training.max_steps=12", "training.learning_rate=3e-3",
            "training.log_every=1", "sample.max_new_tokens=0",
            f"training.output_dir={out}"]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert losses[-1] < losses[0]
    assert main(["eval", str(out)]) == 0
    assert "val loss" in capsys.readouterr().out
    assert main(["train", *args[1:3], f"training.output_dir={tmp_path / 'x'}"]) == 2
    assert "go together" in capsys.readouterr().err
    one = [a for a in args if not a.startswith("training.batch_size")] + ["training.batch_size=1"]
    assert main([*one[:-2], f"training.output_dir={tmp_path / 'y'}", one[-1]]) == 2
    assert "needs training.batch_size >= 2" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def _rank(rank, world, init, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    q, p = torch.randn(8, 6), torch.randn(8, 6)
    half = slice(4 * rank, 4 * rank + 4)
    ql, pl = q[half].clone().requires_grad_(), p[half].clone().requires_grad_()
    loss = info_nce(ql, pl, 0.1)
    loss.backward()
    torch.save({"loss": loss.detach(), "gq": ql.grad, "gp": pl.grad}, f"{out}/{rank}.pt")
    dist.barrier()  # no rank tears down while another still talks
    dist.destroy_process_group()
    # The results are on disk: skip the interpreter's teardown, where gloo has been seen to
    # abort now and then under load (a non-zero exit fails the spawn, not the test's point).
    os._exit(0)


def test_negatives_come_from_every_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(2, f"file://{tmp_path}/store", str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    q = torch.randn(8, 6).requires_grad_()
    p = torch.randn(8, 6).requires_grad_()
    full = info_nce(q, p, 0.1)  # one process, the global batch
    full.backward()
    r = [torch.load(tmp_path / f"{i}.pt") for i in range(2)]
    # The ranks' mean loss is the global batch's; each rank's input gradient is the sum over
    # ranks' losses (the gather's backward), i.e. world size x the global mean's gradient.
    torch.testing.assert_close((r[0]["loss"] + r[1]["loss"]) / 2, full.detach())
    torch.testing.assert_close(torch.cat([r[0]["gq"], r[1]["gq"]]) / 2, q.grad)
    torch.testing.assert_close(torch.cat([r[0]["gp"], r[1]["gp"]]) / 2, p.grad)
