"""BLEU and chrF of generations: the streaming sums equal sacrebleu's corpus scores; the
prompt / reference file's problems are one-line errors; `eval --generation` prints them."""

import json

import pytest

from bitnet_training import BitNetError
from bitnet_training.cli import main
from bitnet_training.metrics import GenerationScores, read_pairs

sacrebleu = pytest.importorskip("sacrebleu", reason="sacrebleu is in the dev extra")

HYPS = ["the cat sat on the mat", "a dog barks", "", "ternary weights are -1, 0 or 1"]
REFS = ["the cat is on the mat", "a big dog barks loudly", "nothing", "weights are -1, 0 or +1"]


def test_streaming_scores_equal_sacrebleus_corpus_scores():
    s = GenerationScores()
    for h, r in zip(HYPS, REFS, strict=True):
        s.update(h, r)
    got = s.compute()
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score, abs=1e-9)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score, abs=1e-9)
    with pytest.raises(BitNetError, match="no generation pairs"):
        GenerationScores().compute()


def test_the_pairs_file_is_checked(tmp_path):
    cases = {"missing": None, "empty": "\n", "junk": "{nope\n", "keys": '{"prompt": "a"}\n'}
    messages = {
        "missing": "does not exist",
        "empty": "has no prompt / reference pairs",
        "junk": "line 1 is not JSON",
        "keys": "needs string 'prompt' and 'reference'",
    }
    for name, text in cases.items():
        f = tmp_path / f"{name}.jsonl"
        if text is not None:
            f.write_text(text)
        with pytest.raises(BitNetError, match=messages[name]):
            list(read_pairs(str(f)))


def test_eval_scores_generations_of_a_run(tmp_path, capsys):
    from test_cli import MICRO, write_corpus

    data = write_corpus(tmp_path)
    out = tmp_path / "run"
    args = ["train", "--no-progress", *MICRO, *data, "training.max_steps=2",
            "sample.max_new_tokens=0", f"training.output_dir={out}"]  # fmt: skip
    assert main(args) == 0
    pairs = tmp_path / "pairs.jsonl"
    rows = [("the quick", " brown fox"), ("a lazy", " dog")]
    pairs.write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n" for p, r in rows))
    capsys.readouterr()
    assert main(["eval", str(out), "--generation", str(pairs), "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "generation   2 prompts" in printed and "bleu " in printed and "chrf " in printed
