import json

import pytest
import torch
from torch.utils.data import DataLoader

from bitnet_training.data import ByteTokenizer, StreamingTextDataset

DOCS = [f"doc {i:03d} " + "abc " * (i % 7) for i in range(101)]


@pytest.fixture
def files(tmp_path):
    with open(tmp_path / "a.jsonl", "w") as f:
        for d in DOCS[:60]:
            f.write(json.dumps({"text": d}) + "\n")
    for i, d in enumerate(DOCS[60:]):
        (tmp_path / f"t{i:03d}.txt").write_text(d)
    return [str(tmp_path)]


def _docs_of(items, tok):
    """Rebuild a stream's documents from its windows (they overlap by one token)."""
    stream = []
    for k, it in enumerate(items):
        ids, labels = it["input_ids"], it["labels"]
        keep = ids[labels != -100] if k == 0 else ids[1:][labels[1:] != -100]
        stream.extend(keep.tolist())
    text = tok.decode(stream, skip_special_tokens=False)
    return [d for d in text.split("<|eos|>") if d]


def test_ranks_times_workers_split_documents_exactly(files):
    tok = ByteTokenizer()
    seen = []
    for rank in range(2):
        ds = StreamingTextDataset(files, tok, seq_len=16, rank=rank, world_size=2)
        for worker in range(2):  # what DataLoader worker `worker` of 2 reads
            seen += list(ds.documents(rank * 2 + worker, 4))
    assert sorted(seen) == sorted(DOCS)  # no overlap, nothing dropped
    # And through real DataLoader workers: every token of every document arrives once.
    total = 0
    for rank in range(2):
        ds = StreamingTextDataset(files, tok, seq_len=16, rank=rank, world_size=2)
        for batch in DataLoader(ds, batch_size=None, num_workers=2):
            total += int((batch["labels"][1:] != -100).sum())
    n_streams_first_tokens = 4  # each stream's first token is never a target
    assert total == sum(len(d.encode()) + 1 for d in DOCS) - n_streams_first_tokens


def test_stream_windows_round_trip(files):
    tok = ByteTokenizer()
    ds = StreamingTextDataset(files, tok, seq_len=16)
    assert sorted(_docs_of(list(ds), tok)) == sorted(DOCS)


def test_shuffle_buffer_is_seeded_and_a_permutation(files):
    tok = ByteTokenizer()
    plain = [tuple(x["input_ids"].tolist()) for x in StreamingTextDataset(files, tok, 16)]
    a = StreamingTextDataset(files, tok, 16, seed=1, shuffle_buffer=8)
    first = [tuple(x["input_ids"].tolist()) for x in a]
    again = [tuple(x["input_ids"].tolist()) for x in a]
    a.set_epoch(1)
    other = [tuple(x["input_ids"].tolist()) for x in a]
    assert first == again and first != plain and other != first
    assert sorted(first) == sorted(plain) == sorted(other)


def test_training_on_a_stream_resumes_exactly(tmp_path, files, micro_model):
    from bitnet_training.train import Callback, Trainer, TrainingConfig

    tok = ByteTokenizer()
    ds = StreamingTextDataset(files, tok, seq_len=16, shuffle_buffer=16)
    kw = dict(
        batch_size=4,
        max_steps=45,
        log_every=1,
        save_every=5,
        mixed_precision="fp32",
        dataloader_workers=2,
    )
    full = Trainer(micro_model(), TrainingConfig(output_dir=str(tmp_path / "a"), **kw), ds).train()
    assert max(h["epoch"] for h in full.history if h["kind"] == "train") >= 1  # crosses epochs

    class Stop(Callback):
        def on_step_end(self, trainer):
            trainer.state.should_stop = trainer.state.step == 15

    part = Trainer(
        micro_model(), TrainingConfig(output_dir=str(tmp_path / "b"), **kw), ds, callbacks=[Stop()]
    ).train()
    rest = Trainer(
        micro_model(seed=2), TrainingConfig(output_dir=str(tmp_path / "b"), **kw), ds
    ).train(resume_from="latest")
    losses = [h["loss"] for r in (part, rest) for h in r.history if h["kind"] == "train"]
    assert losses == [h["loss"] for h in full.history if h["kind"] == "train"]


def test_stream_needs_max_steps(tmp_path, files, micro_model):
    from bitnet_training import BitNetError
    from bitnet_training.train import Trainer, TrainingConfig

    ds = StreamingTextDataset(files, ByteTokenizer(), seq_len=16)
    with pytest.raises(BitNetError, match="max_steps is needed"):
        Trainer(micro_model(), TrainingConfig(output_dir=str(tmp_path)), ds).train()
    assert torch.is_tensor(next(iter(ds))["input_ids"])
