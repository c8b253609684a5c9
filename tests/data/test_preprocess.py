import gzip
import json
import os

import numpy as np
import pytest

from bitnet_training import BitNetError
from bitnet_training.data import (
    ByteTokenizer,
    PreprocessConfig,
    ShardDataset,
    load_index,
    load_tokenizer,
    preprocess,
)

DOCS = [f"document {i}: " + "héllo wörld, ternary weights learn. " * (1 + i % 5) for i in range(60)]


@pytest.fixture
def inputs(tmp_path):
    src = tmp_path / "src"
    (src / "nested").mkdir(parents=True)
    for i, d in enumerate(DOCS[:20]):
        (src / f"t{i:02d}.txt").write_text(d)
    with open(src / "nested" / "a.jsonl", "w") as f:
        for d in DOCS[20:40]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    with gzip.open(src / "nested" / "b.jsonl.gz", "wt") as f:
        for d in DOCS[40:]:
            f.write(json.dumps({"text": d}) + "\n")
    return src


def _decode_split(out, split, tok):
    index = load_index(out)
    docs = []
    for shard in index["splits"][split]["shards"]:
        tokens = np.fromfile(os.path.join(out, shard["file"]), dtype=index["dtype"])
        starts = np.fromfile(os.path.join(out, shard["file"][:-4] + ".idx"), dtype=np.uint64)
        ends = [*starts[1:], len(tokens)]
        for s, e in zip(starts, ends, strict=True):
            assert tokens[e - 1] == tok.eos_token_id  # every document ends with EOS
            docs.append(tok.decode(tokens[s : e - 1]))
    return docs


@pytest.mark.parametrize("workers", [1, 2])
def test_round_trip_text_to_shards_to_text(tmp_path, inputs, workers):
    out = tmp_path / "out"
    index = preprocess(
        PreprocessConfig(
            inputs=[str(inputs)],
            output=str(out),
            val_fraction=0.2,
            shard_tokens=700,
            workers=workers,
        )
    )
    tok = load_tokenizer(str(out))
    assert isinstance(tok, ByteTokenizer) and index["dtype"] == "uint16"
    train, val = _decode_split(out, "train", tok), _decode_split(out, "val", tok)
    assert sorted(train + val) == sorted(DOCS)  # nothing lost, nothing doubled
    assert 0 < len(val) < 30 and len(index["splits"]["train"]["shards"]) > 1
    st = index["stats"]
    assert st["documents"] == 60 and st["bytes"] == sum(len(d.encode()) for d in DOCS)
    assert st["tokens"] == st["bytes"] + 60  # one byte per token, plus EOS per document
    # The split is by document and stable: the same settings give the same split.
    again = preprocess(
        PreprocessConfig(
            inputs=[str(inputs)], output=str(tmp_path / "again"), val_fraction=0.2, workers=workers
        )
    )
    assert again["splits"]["val"]["documents"] == index["splits"]["val"]["documents"]


def test_bpe_tokenizer_loads_in_transformers(tmp_path, inputs):
    out = tmp_path / "bpe"
    index = preprocess(
        PreprocessConfig(
            inputs=[str(inputs)], output=str(out), tokenizer="bpe", vocab_size=300, workers=1
        )
    )
    tok = load_tokenizer(str(out))
    assert index["tokenizer"]["kind"] == "hf" and tok.vocab_size <= 300
    assert _decode_split(out, "train", tok) + _decode_split(out, "val", tok) != []
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    text = DOCS[3]
    assert hf(text)["input_ids"] == tok.encode(text) and hf.decode(tok.encode(text)) == text
    # An existing tokenizer.json is reused as is.
    again = preprocess(
        PreprocessConfig(
            inputs=[str(inputs)],
            output=str(tmp_path / "re"),
            tokenizer=str(out / "tokenizer.json"),
            workers=1,
        )
    )
    assert again["tokenizer"]["hash"] == index["tokenizer"]["hash"]


def test_utf8_policies(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf" + b"\xe9 au lait")
    good = tmp_path / "good.txt"
    good.write_text("fine text here")
    cfg = dict(inputs=[str(bad), str(good)], workers=1, val_fraction=0.0)
    with pytest.raises(BitNetError, match=r"bad.txt: invalid UTF-8 at byte 3"):
        preprocess(PreprocessConfig(output=str(tmp_path / "e"), **cfg))
    assert not (tmp_path / "e").exists() and not list(tmp_path.glob(".tmp-*"))
    r = preprocess(PreprocessConfig(output=str(tmp_path / "r"), invalid_utf8="replace", **cfg))
    assert r["stats"]["invalid_utf8_replaced"] == 1 and r["stats"]["documents"] == 2
    s = preprocess(PreprocessConfig(output=str(tmp_path / "s"), invalid_utf8="skip", **cfg))
    assert s["stats"]["invalid_utf8_skipped"] == 1 and s["stats"]["documents"] == 1


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "a"}\n{"body": "b"}\n', r"x.jsonl:2: no 'text' field"),
        ('{"text": "a"}\nnot json\n', r"x.jsonl:2: not valid JSON"),
        ('{"text": 5}\n', r"x.jsonl:1: field 'text' is not a string"),
        ("\n\n", "hold no documents for training"),
    ],
)
def test_bad_jsonl(tmp_path, content, message):
    f = tmp_path / "x.jsonl"
    f.write_text(content)
    with pytest.raises(BitNetError, match=message):
        preprocess(PreprocessConfig(inputs=[str(f)], output=str(tmp_path / "o"), workers=1))
    assert not (tmp_path / "o").exists()


def test_bad_inputs_and_existing_output(tmp_path, inputs):
    with pytest.raises(BitNetError, match="does not exist"):
        preprocess(
            PreprocessConfig(inputs=[str(tmp_path / "none.txt")], output=str(tmp_path / "o"))
        )
    with pytest.raises(BitNetError, match="matches no files"):
        preprocess(PreprocessConfig(inputs=[str(tmp_path / "*.none")], output=str(tmp_path / "o")))
    gz = tmp_path / "broken.txt.gz"
    gz.write_bytes(b"not gzip at all")
    with pytest.raises(BitNetError, match="cannot read"):
        preprocess(PreprocessConfig(inputs=[str(gz)], output=str(tmp_path / "o"), workers=1))
    out = tmp_path / "out"
    cfg = dict(inputs=[str(inputs)], output=str(out), workers=1)
    preprocess(PreprocessConfig(**cfg))
    before = sorted(os.listdir(out))
    with pytest.raises(BitNetError, match="already holds these shards"):
        preprocess(PreprocessConfig(**cfg))
    with pytest.raises(BitNetError, match="already holds other files or shards"):
        preprocess(PreprocessConfig(**{**cfg, "val_fraction": 0.5}))
    assert sorted(os.listdir(out)) == before
    preprocess(PreprocessConfig(**{**cfg, "val_fraction": 0.5, "overwrite": True}))
    assert load_index(str(out))["settings"]["val_fraction"] == 0.5


def test_shard_dataset_windows_and_random_sampling(tmp_path, inputs):
    out = str(tmp_path / "out")
    preprocess(
        PreprocessConfig(
            inputs=[str(inputs)], output=out, shard_tokens=500, val_fraction=0.0, workers=1
        )
    )
    ds = ShardDataset(out, "train", seq_len=64)
    stream = np.concatenate(
        [
            np.fromfile(os.path.join(out, s["file"]), dtype=np.uint16)
            for s in load_index(out)["splits"]["train"]["shards"]
        ]
    )
    assert ds.num_tokens == len(stream)
    targets = np.concatenate([ds[i]["labels"][1:].numpy() for i in range(len(ds))])
    np.testing.assert_array_equal(targets, stream[1 : 1 + len(targets)])  # across shard edges
    rnd = ShardDataset(out, "train", seq_len=64, sampling="random", seed=3)
    a = [rnd[i]["input_ids"] for i in range(5)]
    assert all((x == rnd[i]["input_ids"]).all() for i, x in enumerate(a))  # deterministic
    rnd.set_epoch(1)
    assert not all((x == rnd[i]["input_ids"]).all() for i, x in enumerate(a))  # new epoch
    os.truncate(os.path.join(out, "train-00000.idx"), 8)
    with pytest.raises(BitNetError, match="shard index .* is missing or truncated"):
        ShardDataset(out, "train", seq_len=64)
    os.truncate(os.path.join(out, "train-00000.bin"), 10)
    with pytest.raises(BitNetError, match="missing or truncated"):
        ShardDataset(out, "train", seq_len=64)


def test_training_on_shards_resumes_exactly(tmp_path, inputs, micro_model):
    from bitnet_training.train import Callback, Trainer, TrainingConfig

    out = str(tmp_path / "out")
    preprocess(PreprocessConfig(inputs=[str(inputs)], output=out, val_fraction=0.1, workers=1))
    data = ShardDataset(out, "train", seq_len=32, sampling="random", seed=0)
    kw = dict(batch_size=4, max_steps=8, log_every=1, save_every=3, mixed_precision="fp32")

    class Stop(Callback):
        def on_step_end(self, trainer):
            trainer.state.should_stop = trainer.state.step == 3

    full = Trainer(
        micro_model(), TrainingConfig(output_dir=str(tmp_path / "a"), **kw), data
    ).train()
    part = Trainer(
        micro_model(),
        TrainingConfig(output_dir=str(tmp_path / "b"), **kw),
        data,
        callbacks=[Stop()],
    ).train()
    rest = Trainer(
        micro_model(seed=4), TrainingConfig(output_dir=str(tmp_path / "b"), **kw), data
    ).train(resume_from="latest")
    losses = [h["loss"] for r in (part, rest) for h in r.history if h["kind"] == "train"]
    assert losses == [h["loss"] for h in full.history if h["kind"] == "train"]
