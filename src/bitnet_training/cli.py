"""`bitnet-train` (also `python -m bitnet_training`): train, evaluate and sample BitNet models.

    bitnet-train train [--config FILE] [--resume [CKPT]] [--overwrite] [key=value ...]
    bitnet-train train --config FILE --print-config [key=value ...]
    bitnet-train eval CKPT [key=value ...]
    bitnet-train generate CKPT --prompt TEXT [--max-new-tokens N] [--temperature T] ...

The CLI owns the terminal: progress on stderr, the summary on stdout. Errors the user can fix
print one line and exit with status 2; an interrupted run exits with 128 + the signal number
after saving its checkpoint.
"""

from __future__ import annotations

import argparse
import glob
import logging
import math
import os
import shutil
import sys
import time

import torch

from . import __version__
from .config import RunConfig, apply_override, config_from_dict, load_config
from .data import (
    PreprocessConfig,
    build_datasets,
    build_eval_dataset,
    preprocess,
    tokenizer_for,
    tokenizer_id,
)
from .errors import BitNetError
from .models import BitNetLM
from .train import (
    Callback,
    MultiStage,
    ProgressBar,
    QATControl,
    QuantizationTuner,
    TernaryDiagnostics,
    Trainer,
    list_checkpoints,
)
from .train import checkpoint as ckpt_io

log = logging.getLogger("bitnet_training")

EPILOG = """\
overrides are dotted config keys, e.g. training.max_steps=200 qat.weight_bits=1
  model_preset=tiny|small|2b4t   model.<field>   quantize=true|false   qat.<field>
  training.<field> (training.optimizer.<field>, training.scheduler.<field>)
  data.source=embedded|files data.train_files=a.txt,b.txt data.val_files=...
  sample.prompt=... sample.max_new_tokens=N
see `bitnet-train train --print-config` for every key and its current value.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: `bitnet-train: error: ...`, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"bitnet-train: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bitnet-train",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"bitnet-training {__version__}")
    sub = p.add_subparsers(
        dest="command",
        required=True,
        metavar="{train,eval,generate,preprocess}",
        parser_class=_Parser,
    )

    t = sub.add_parser(
        "train",
        help="train a model (default: tiny BitNet b1.58 on the embedded corpus)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("--config", help="YAML run config (default: built-in defaults)")
    t.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    t.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CKPT",
        help="continue from a checkpoint (default: the output_dir's latest)",
    )
    t.add_argument(
        "--overwrite",
        action="store_true",
        help="delete checkpoints and logs already in training.output_dir first",
    )
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("overrides", nargs="*", metavar="key=value")

    e = sub.add_parser(
        "eval",
        help="loss, perplexity and bits per byte of a checkpoint",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("checkpoint", help="a checkpoint directory or a run directory (its latest)")
    e.add_argument("--max-batches", type=int, default=None, help="evaluate at most N batches")
    e.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="e.g. data.source=files data.val_files=my.txt",
    )

    pp = sub.add_parser("preprocess", help="tokenize text / JSON lines (.gz too) into shards")
    pp.add_argument("inputs", nargs="+", help="files, directories or glob patterns")
    pp.add_argument("--output", "-o", required=True, help="the shard directory to write")
    pp.add_argument(
        "--tokenizer",
        default="byte",
        help="byte (default), bpe (trained on the inputs) or a tokenizer.json",
    )
    pp.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (8192)")
    pp.add_argument(
        "--special-tokens",
        default=None,
        help="comma-separated BPE special tokens, including an end-of-text token (<|endoftext|>)",
    )
    pp.add_argument("--jsonl-field", default="text", help="the text field of JSON lines")
    pp.add_argument("--invalid-utf8", default="error", choices=("error", "replace", "skip"))
    pp.add_argument("--val-fraction", type=float, default=0.01)
    pp.add_argument("--shard-tokens", type=int, default=1 << 26, help="tokens per shard")
    pp.add_argument(
        "--workers",
        type=int,
        default=1,
        help="tokenizing processes (BPE already uses every core inside tokenizers)",
    )
    pp.add_argument("--overwrite", action="store_true", help="replace an existing output")
    pp.add_argument("--no-progress", action="store_true")

    g = sub.add_parser("generate", help="continue a prompt with a checkpoint's model")
    g.add_argument("checkpoint", help="a checkpoint directory or a run directory (its latest)")
    g.add_argument("--prompt", default=None, help="text to continue (default: sample.prompt)")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    return p


# ------------------------------------------------------------------------------ helpers
def build_model(cfg: RunConfig) -> BitNetLM:
    """The model a run config describes (BitNet b1.58 with `cfg.qat`, or full precision
    when `quantize` is false), initialized under `training.seed`."""
    torch.manual_seed(cfg.training.seed)
    return BitNetLM(cfg.model, qat=cfg.qat if cfg.quantize else False)


def _check_vocab(cfg: RunConfig, tokenizer) -> None:
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise BitNetError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
            f"{cfg.model.vocab_size}: set model.vocab_size >= {tokenizer.vocab_size}"
        )


def load_run(path: str, overrides: list[str] = ()) -> tuple[RunConfig, BitNetLM, str]:
    """The run config (with `overrides`), model and checkpoint directory of `path`."""
    ckpt = ckpt_io.resolve_checkpoint(path)
    ckpt_io.read_state(ckpt)  # checks the format version
    meta = ckpt_io.read_metadata(ckpt)
    data = meta.get("run_config")
    if not isinstance(data, dict):
        raise BitNetError(f"checkpoint {ckpt!r} has no run config (not written by bitnet-train)")
    for item in overrides:
        apply_override(data, item)
    cfg = config_from_dict(data)
    model = build_model(cfg)
    ckpt_io.load_model_weights(model, ckpt)
    return cfg, model, ckpt


def sample_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
) -> str:
    """`prompt` continued by `model` (sampling when temperature > 0, else greedy)."""
    # Training text is documents joined by EOS, so a document starts right after an EOS:
    # prefixing one makes the prompt look like the start of a document.
    ids = torch.tensor([[tokenizer.eos_token_id, *tokenizer.encode(prompt)]])
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit is not None:
        max_new_tokens = max(0, min(max_new_tokens, limit - ids.shape[1]))
    g = torch.Generator().manual_seed(seed)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature or 1.0,
            top_k=top_k,
            eos_token_id=tokenizer.eos_token_id,
            generator=g,
            vocab_limit=tokenizer.vocab_size,
        )
    return tokenizer.decode(out[0])


def _prepare_output_dir(out: str, resume: str | None, overwrite: bool) -> None:
    if resume is not None and overwrite:
        raise BitNetError("--resume and --overwrite exclude each other: choose one")
    if os.path.exists(out) and not os.path.isdir(out):
        raise BitNetError(f"training.output_dir {out!r} is a file, not a directory")
    existing = list_checkpoints(out)
    logs = os.path.join(out, "metrics.jsonl")
    used = existing or (os.path.isfile(logs) and os.path.getsize(logs) > 0)  # a run that logged
    if used and resume is None and not overwrite:
        what = "checkpoints" if existing else "a previous run's logs (metrics.jsonl)"
        raise BitNetError(
            f"training.output_dir {out!r} already holds {what}: pass --resume to "
            "continue, --overwrite to start again, or choose another training.output_dir"
        )
    if overwrite and resume is None and os.path.isdir(out):
        for path in existing + glob.glob(os.path.join(out, ".tmp-checkpoint-*")):
            shutil.rmtree(path)
        for name in ("latest", "best", "metrics.jsonl"):
            if os.path.exists(os.path.join(out, name)):
                os.remove(os.path.join(out, name))
        shutil.rmtree(os.path.join(out, "tensorboard"), ignore_errors=True)


# ----------------------------------------------------------------------------- commands
class _Announce(Callback):
    order = -100

    def __init__(self, lines: list[str]):
        self.lines = lines

    def on_train_begin(self, trainer):
        for line in self.lines:
            log.info("%s", line)


def _absolute_paths(cfg: RunConfig) -> None:
    """Data paths as absolute paths, so a run's stored config works from anywhere."""
    d = cfg.data
    d.train_files = [os.path.abspath(f) for f in d.train_files]
    d.val_files = [os.path.abspath(f) for f in d.val_files]
    if d.shards_dir:
        d.shards_dir = os.path.abspath(d.shards_dir)
    if cfg.init_from:
        cfg.init_from = os.path.abspath(cfg.init_from)


def _check_tokenizer(path: str, tokenizer) -> None:
    """Refuse to use a checkpoint under another tokenizer than the one it was trained with."""
    ckpt = ckpt_io.resolve_checkpoint(path)
    saved = ckpt_io.read_metadata(ckpt).get("tokenizer_id")
    ours = tokenizer_id(tokenizer)
    if saved is not None and saved != ours:
        raise BitNetError(
            f"checkpoint {ckpt!r} was trained with tokenizer {saved}, this data uses {ours}: "
            "evaluate and resume with data of the same tokenizer"
        )


def _check_resumable(cfg: RunConfig, resume: str) -> None:
    """Refuse a resume whose checkpoint was trained as another kind of model."""
    ckpt = ckpt_io.resolve_checkpoint(cfg.training.output_dir if resume == "latest" else resume)
    old = ckpt_io.read_metadata(ckpt).get("run_config")
    if not isinstance(old, dict):
        return  # not written by the CLI: the Trainer's own checks still apply
    if old.get("quantize") != cfg.quantize:
        raise BitNetError(
            f"checkpoint {ckpt!r} was trained with quantize={str(old.get('quantize')).lower()}; "
            f"this run has quantize={str(cfg.quantize).lower()}"
        )
    if old.get("qat") != cfg.to_dict()["qat"] and cfg.quantize:
        log.warning("resuming with QAT settings that differ from the checkpoint's")


def cmd_train(args) -> int:
    if args.resume is not None and "=" in args.resume and not os.path.exists(args.resume):
        # `--resume key=value`: the override was taken for the optional checkpoint path.
        args.overrides = [args.resume, *args.overrides]
        args.resume = "latest"
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(cfg.to_yaml())
        return 0
    if not cfg.quantize and (cfg.stages or cfg.qat_tuner is not None):
        raise BitNetError("stages and qat_tuner need quantize=true")
    _absolute_paths(cfg)
    out = cfg.training.output_dir
    _prepare_output_dir(out, args.resume, args.overwrite)
    if args.resume is not None:
        _check_resumable(cfg, args.resume)
    tokenizer = tokenizer_for(cfg.data)
    _check_vocab(cfg, tokenizer)
    if args.resume is not None:
        _check_tokenizer(
            cfg.training.output_dir if args.resume == "latest" else args.resume, tokenizer
        )
    t0 = time.perf_counter()
    data = build_datasets(cfg.data, tokenizer, cfg.training.seed)
    if cfg.data.source == "stream":
        about = [f"data: streaming {data.info['train_files']} files (read lazily)"]
    else:
        about = [
            f"data: {data.info['source']}, {data.info['train_tokens']} training and "
            f"{data.info['val_tokens']} validation tokens (fingerprint "
            f"{data.info['fingerprint']}, {time.perf_counter() - t0:.1f} s)"
        ]
    model = build_model(cfg)
    if cfg.init_from and args.resume is None:
        init = ckpt_io.resolve_checkpoint(cfg.init_from)
        _check_tokenizer(init, tokenizer)
        # Quantizer state (observer ranges, LSQ scales) starts afresh: a full-precision
        # checkpoint has none.
        ckpt_io.load_model_weights(
            model, init, may_miss=lambda k: "act_observer." in k or "act_scale" in k
        )
        about.append(f"init: weights from {init}")
    n = sum(p.numel() for p in model.parameters())
    about.append(
        f"model: {cfg.model_preset}, {n / 1e6:.2f} M parameters, "
        + ("BitNet b1.58 QAT" if cfg.quantize else "full precision")
    )
    # Said once training starts (after a resume is checked), so an error stays one line.
    callbacks = [_Announce(about)] + ([] if args.no_progress else [ProgressBar()])
    if cfg.quantize:
        callbacks.append(QATControl())
        if cfg.stages:
            callbacks.append(MultiStage(cfg.stages, cfg.qat))
        if cfg.qat_tuner is not None:
            callbacks.append(QuantizationTuner(cfg.qat_tuner))
        if cfg.diagnostics:
            callbacks.append(TernaryDiagnostics())
    metadata = {
        "run_config": cfg.to_dict(),
        "data": data.info,
        "tokenizer_id": tokenizer_id(tokenizer),
    }
    trainer = Trainer(model, cfg.training, data.train, data.val, callbacks, metadata)
    result = trainer.train(resume_from=args.resume)
    _print_summary(cfg, result, data, model, tokenizer)
    if result.interrupted:
        return 128 + (result.signal or 2)
    return 0


def _print_summary(cfg, result, data, model, tokenizer) -> None:
    m = result.metrics
    lines = ["", "== summary =="]
    lines.append(
        f"model        {cfg.model_preset}, "
        + (
            f"BitNet {cfg.qat.weight_bits}-bit weights / "
            f"{cfg.qat.activation_bits or 'fp'}-bit activations"
            if cfg.quantize
            else "full precision"
        )
    )
    lines.append(f"device       {result.device}, precision {result.precision}")
    tps = result.tokens_per_s
    lines.append(
        f"steps        {result.steps} ({result.tokens:,} tokens, {tps:,.0f} tokens/s)"
        + (" - interrupted" if result.interrupted else "")
    )
    if m.get("train_loss") is not None:
        lines.append(f"train loss   {m['train_loss']:.4f}")
    if "val_loss" in m:
        lines.append(
            f"val loss     {m['val_loss']:.4f}   perplexity {m['val_perplexity']:.2f}"
            f"   bits/byte {m.get('val_bits_per_byte', float('nan')):.3f}"
        )
    elif data.val is None:
        hint = (
            "the shards have no validation documents: preprocess with a larger --val-fraction"
            if cfg.data.source == "shards"
            else "set data.val_files"
        )
        lines.append(f"validation   none (no validation text: {hint})")
    lines.append(f"wall time    {result.wall_time_s:.1f} s")
    lines.append(f"checkpoint   {result.last_checkpoint}")
    if result.best_checkpoint and result.best_checkpoint != result.last_checkpoint:
        lines.append(
            f"best         {result.best_checkpoint} ({cfg.training.best_metric} "
            f"{result.best_metric:.4f})"
        )
    s = cfg.sample
    if s.max_new_tokens and not result.interrupted:
        text = sample_text(
            model.cpu(), tokenizer, s.prompt, s.max_new_tokens, s.temperature, s.top_k, s.seed
        )
        lines.append(f"sample       {text!r}")
    sys.stdout.write("\n".join(lines) + "\n")


def cmd_eval(args) -> int:
    cfg, model, ckpt = load_run(args.checkpoint, args.overrides)
    tokenizer = tokenizer_for(cfg.data)
    _check_vocab(cfg, tokenizer)
    _check_tokenizer(ckpt, tokenizer)
    val = build_eval_dataset(cfg.data, tokenizer)
    if val is None:
        hint = (
            "the shards have no validation split (preprocess --val-fraction)"
            if cfg.data.source == "shards"
            else "the data has no validation text"
        )
        raise BitNetError(f"nothing to evaluate: {hint}; set data.val_files=FILE[,FILE...]")
    if args.max_batches is not None and args.max_batches < 1:
        raise BitNetError(f"--max-batches={args.max_batches} is invalid: expected an integer >= 1")
    trainer = Trainer(model, cfg.training, None, val)  # loggers stay idle outside train()
    m = trainer.evaluate(max_batches=args.max_batches)
    sys.stdout.write(
        f"checkpoint   {ckpt}\n"
        f"val loss     {m['val_loss']:.4f}\n"
        f"perplexity   {m['val_perplexity']:.2f}\n"
        f"bits/byte    {m.get('val_bits_per_byte', float('nan')):.4f}\n"
    )
    return 0


def cmd_generate(args) -> int:
    cfg, model, ckpt = load_run(args.checkpoint)
    s = cfg.sample
    prompt = s.prompt if args.prompt is None else args.prompt
    n = s.max_new_tokens if args.max_new_tokens is None else args.max_new_tokens
    temperature = s.temperature if args.temperature is None else args.temperature
    top_k = s.top_k if args.top_k is None else args.top_k
    seed = s.seed if args.seed is None else args.seed
    if n < 0:
        raise BitNetError(f"--max-new-tokens={n} is invalid: expected an integer >= 0")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise BitNetError(f"--temperature={temperature} is invalid: expected a number >= 0")
    if seed < 0:
        raise BitNetError(f"--seed={seed} is invalid: expected an integer >= 0")
    if top_k is not None and top_k < 1:
        raise BitNetError(f"--top-k={top_k} is invalid: expected a positive integer")
    tokenizer = tokenizer_for(cfg.data)
    _check_tokenizer(ckpt, tokenizer)
    text = sample_text(model, tokenizer, prompt, n, temperature, top_k, seed)
    sys.stdout.write(text + "\n")
    return 0


def cmd_preprocess(args) -> int:
    if args.tokenizer != "bpe" and (args.vocab_size is not None or args.special_tokens is not None):
        raise BitNetError("--vocab-size and --special-tokens apply to --tokenizer bpe only")
    args.vocab_size = 8192 if args.vocab_size is None else args.vocab_size
    args.special_tokens = args.special_tokens or "<|endoftext|>"
    cfg = PreprocessConfig(
        inputs=args.inputs,
        output=args.output,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        special_tokens=[t for t in args.special_tokens.split(",") if t],
        jsonl_field=args.jsonl_field,
        invalid_utf8=args.invalid_utf8,
        val_fraction=args.val_fraction,
        shard_tokens=args.shard_tokens,
        workers=args.workers,
        overwrite=args.overwrite,
    )
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(unit="B", unit_scale=True, desc="preprocess", file=sys.stderr, leave=False)
    try:
        index = preprocess(cfg, progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    st, sp = index["stats"], index["splits"]
    tok = index["tokenizer"]
    sys.stdout.write(
        f"output       {os.path.abspath(args.output)}\n"
        f"tokenizer    {tok['kind']} (vocab {tok['vocab_size']}, {index['dtype']} shards)\n"
        f"documents    {st['documents']:,} (train {sp['train']['documents']:,}, "
        f"val {sp['val']['documents']:,}; {st['empty_documents']} empty skipped)\n"
        f"tokens       {st['tokens']:,} (train {sp['train']['tokens']:,}, "
        f"val {sp['val']['tokens']:,})\n"
        f"invalid utf8 {st['invalid_utf8_replaced']} replaced, "
        f"{st['invalid_utf8_skipped']} skipped\n"
        f"throughput   {st['mb_per_s']:.1f} MB/s, {st['tokens_per_s']:,.0f} tokens/s "
        f"({st['seconds']:.1f} s)\n"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        # Overrides may come before or after options: collect every stray `key=value`.
        args, extra = parser.parse_known_args(argv)
        stray = [a for a in extra if a.startswith("-") or "=" not in a]
        if stray or (extra and not hasattr(args, "overrides")):
            parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    except SystemExit as e:  # --help, --version, or a usage error (already printed)
        return e.code if isinstance(e.code, int) else 2
    if extra:
        args.overrides = list(args.overrides) + extra
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    commands = {
        "train": cmd_train,
        "eval": cmd_eval,
        "generate": cmd_generate,
        "preprocess": cmd_preprocess,
    }
    try:
        return commands[args.command](args)
    except BitNetError as e:
        sys.stderr.write(f"bitnet-train: error: {e}\n")
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: exit at once
        sys.stderr.write("bitnet-train: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
