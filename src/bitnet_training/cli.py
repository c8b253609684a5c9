"""`bitnet-train` (also `python -m bitnet_training`): train, evaluate and sample BitNet models.

    bitnet-train train [--config FILE] [--resume [CKPT]] [--overwrite] [key=value ...]
    bitnet-train train --config FILE --print-config [key=value ...]
    bitnet-train eval CKPT [key=value ...]
    bitnet-train generate CKPT --prompt TEXT [--max-new-tokens N] [--temperature T] ...
    bitnet-train merge RUN -o DIR [--method auto|requantize|refit]
    bitnet-train consolidate CKPT -o DIR      (sharded FSDP checkpoint -> single files)
    bitnet-train export RUN -o DIR [--format hf|ternary|gguf] (transformers / ours / llama.cpp)
    bitnet-train plan [--config FILE] [--shape 7b] [--fsdp N ...] [--device-memory 24GB]

The CLI owns the terminal: progress on stderr, the summary on stdout. Errors the user can fix
print one line and exit with status 2; an interrupted run exits with 128 + the signal number
after saving its checkpoint.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import warnings

import torch

from . import __version__, recipe
from .config import SampleConfig, load_config
from .data import PreprocessConfig, build_eval_dataset, preprocess
from .distributed.ddp import launched_world_size
from .distributed.wrappers import gathered_root, gathers_in_forward, unwrap
from .errors import BitNetError, ConfigError
from .metrics import read_pairs
from .train import Trainer

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
        metavar="{train,eval,generate,merge,consolidate,export,plan,plot,preprocess}",
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
        "--generation",
        default=None,
        metavar="FILE",
        help="also score greedy continuations of a JSON lines file of {prompt, reference} "
        "with BLEU and chrF (sacrebleu)",
    )
    e.add_argument(
        "--max-new-tokens", type=int, default=64, help="--generation: tokens per continuation"
    )
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

    cs = sub.add_parser("consolidate", help="turn a sharded (FSDP) checkpoint into single files")
    cs.add_argument("checkpoint", help="a sharded checkpoint, or a run (its latest)")
    cs.add_argument("--output", "-o", required=True, help="the new run directory")

    ex = sub.add_parser(
        "export", help="write a run for transformers (hf), llama.cpp (gguf) or packed (ternary)"
    )
    ex.add_argument("run", help="a run (its latest checkpoint) or a checkpoint")
    ex.add_argument("--output", "-o", required=True, help="the new directory")
    ex.add_argument("--format", default="hf", help="hf (default), ternary or gguf")
    ex.add_argument("--gguf-type", default="tq2_0", help="gguf: tq2_0 (default), tq1_0, f16 or f32")
    ex.add_argument(
        "--linear-class",
        default="bitlinear",
        help="hf: bitlinear (weight_scale = 1/gamma) or autobitlinear (weight_scale = gamma)",
    )
    ex.add_argument(
        "--mode", default="offline", help="hf: offline (packed codes) or online (latent weights)"
    )
    ex.add_argument(
        "--dtype",
        help="hf / ternary: the full-precision tensors' dtype (default bfloat16), "
        "float16 or float32",
    )

    pl = sub.add_parser("plan", help="memory per device of a training run, before running it")
    pl.add_argument("--config", help="a run config YAML (else the defaults)")
    pl.add_argument(
        "--shape", help="7b or 13b (LLaMA's shapes) instead of the config's model; or a "
        "transformers config.json for its shape"
    )  # fmt: skip
    for name in ("dp", "fsdp", "tp", "pp"):
        pl.add_argument(f"--{name}", type=int, default=1, help=f"{name} degree (default 1)")
    pl.add_argument("--pp-schedule", default="1f1b", help="1f1b or gpipe")
    pl.add_argument("--pp-microbatches", type=int, help="micro-batches per batch (default: --pp)")
    pl.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    pl.add_argument("--device-memory", help="e.g. 24GB, 80GiB, or h100, a100-40gb, rtx4090")
    pl.add_argument("overrides", nargs="*", help="key=value overrides, as for train")

    mg = sub.add_parser("merge", help="merge a LoRA run's adapters into its base")
    mg.add_argument("run", help="a PEFT (LoRA / AdaLoRA / 1.58-bit QLoRA) run or checkpoint")
    mg.add_argument("--output", "-o", required=True, help="the merged run's directory")
    mg.add_argument(
        "--method",
        default="auto",
        choices=("auto", "requantize", "refit"),
        help="ternary bases: requantize W + BA, or refit its scale; auto measures both",
    )
    mg.add_argument("--max-batches", type=int, default=8, help="held-out batches to measure on")

    pl = sub.add_parser("plot", help="PNG figures of one run, or several compared")
    pl.add_argument("runs", nargs="+", help="run directories (several: one figure compares them)")
    pl.add_argument(
        "--output",
        "-o",
        default=None,
        help="the PNG to write (default: <run>/plots/training.png, or compare.png beside "
        "the first run for several)",
    )

    g = sub.add_parser("generate", help="continue a prompt with a checkpoint's model")
    g.add_argument("checkpoint", help="a checkpoint directory or a run directory (its latest)")
    g.add_argument("--prompt", default=None, help="text to continue (default: sample.prompt)")
    g.add_argument("--max-new-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    return p


# ----------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    if args.resume is not None and "=" in args.resume and not os.path.exists(args.resume):
        # `--resume key=value`: the override was taken for the optional checkpoint path.
        args.overrides = [args.resume, *args.overrides]
        args.resume = "latest"
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        sys.stdout.write(cfg.to_yaml())
        return 0
    if args.no_progress and importlib.util.find_spec("transformers") is not None:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # its weight-loading bars, too
    try:
        run, result = recipe.train(cfg, args.resume, args.overwrite, progress=not args.no_progress)
        # An FSDP model's forward is a collective: every rank generates the sample together.
        sample = _sample(run, result) if gathers_in_forward(run.model) else None
        if run.trainer.is_main:  # under torchrun, rank 0 speaks for the run
            _print_summary(run, result, sample)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if result.interrupted:
        return 128 + (result.signal or 2)
    return 0


def _kernels_line() -> str | None:
    """What ran the quantized layers' matmuls and quantizers: the float GEMM of the
    quantized values and / or the integer GEMMs chosen (None when no fused layer ran)."""
    from collections import Counter

    from .quant import gemm, native

    parts = [f"float GEMM of x_q, w_q ({where})" for where in gemm.dequantized()]
    chosen = Counter(gemm.decisions().values())
    if chosen:
        parts.append(
            "integer GEMM "
            + ", ".join(f"{k} ({n} shape{'s' if n > 1 else ''})" for k, n in chosen.most_common())
        )
        dropped = sorted({name.rsplit(" ", 1)[1] for name in gemm.screened_out()})
        if dropped:
            parts[-1] += f" ({', '.join(dropped)}: no fast path on this CPU, not used)"
    measured = list(gemm.paths().values())
    if measured:  # integer_matmul auto in bf16: which GEMM measured faster, per shape
        parts.append(
            f"integer vs float GEMM measured: integer faster on {measured.count('integer')} "
            f"of {len(measured)} shapes"
        )
    if not parts:
        return None
    quantizers = "native" if native.built() else "PyTorch ops"
    return f"kernels      quantizers {quantizers}; {'; '.join(parts)}"


def _print_summary(run: recipe.Run, result, sample: str | None = None) -> None:
    cfg, data, model = run.config, run.data, unwrap(run.model)
    m = result.metrics
    lines = ["", "== summary =="]
    name = cfg.model.pretrained or cfg.model_preset
    lines.append(f"model        {name}, {recipe.weight_bits_in_force(model)}")
    lines.append(f"device       {result.device}, precision {result.precision}")
    tps = result.tokens_per_s
    lines.append(
        f"steps        {result.steps} ({result.tokens:,} tokens, {tps:,.0f} tokens/s)"
        + (" - interrupted" if result.interrupted else "")
    )
    if m.get("train_loss") is not None:
        extra = cfg.teacher.pretrained or cfg.loss.l1 or cfg.loss.l2 or cfg.loss.z_loss
        extra = extra or cfg.loss.label_smoothing
        note = " (the training objective: its extra terms included)" if extra else ""
        lines.append(f"train loss   {m['train_loss']:.4f}{note}")
    if "val_loss" in m and cfg.loss.objective == "contrastive":
        lines.append(f"val loss     {m['val_loss']:.4f} (InfoNCE)")
    elif "val_loss" in m:
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
    kernels = _kernels_line()
    if kernels:
        lines.append(kernels)
    lines.append(f"wall time    {result.wall_time_s:.1f} s")
    lines.append(f"checkpoint   {result.last_checkpoint}")
    if result.best_checkpoint and result.best_checkpoint != result.last_checkpoint:
        lines.append(
            f"best         {result.best_checkpoint} ({cfg.training.best_metric} "
            f"{result.best_metric:.4f})"
        )
    text = sample if sample is not None else _sample(run, result)
    if text is not None:
        lines.append(f"sample       {text!r}")
    sys.stdout.write("\n".join(lines) + "\n")


def _sample(run: recipe.Run, result) -> str | None:
    """The end-of-run sample text (None when `sample.max_new_tokens=0` or interrupted)."""
    s, model = run.config.sample, unwrap(run.model)
    if not s.max_new_tokens or result.interrupted:
        return None
    if getattr(model, "pipeline", None) is not None:  # the stages' parts, whole on rank 0
        model = recipe.whole_pipelined_model(run)
        if model is None:
            return None
    if not gathers_in_forward(model):
        model = model.cpu()  # generation is sequential: the CPU does it as well as any
    with gathered_root(model):
        return recipe.generate_text(
            model, run.tokenizer, s.prompt, s.max_new_tokens, s.temperature, s.top_k, s.seed
        )


# What `eval` overrides may change: the evaluation data and how it is read; anything else
# (the model, training settings) would be silently ignored, so it is refused.
EVAL_KEYS = (
    "data.",
    "training.batch_size",
    "training.device",
    "training.mixed_precision",
    "training.metrics",
)


def cmd_eval(args) -> int:
    for item in args.overrides:
        key = item.split("=", 1)[0].strip()
        if not key.startswith(EVAL_KEYS):
            raise BitNetError(
                f"eval takes data.*, training.batch_size, training.device, "
                f"training.mixed_precision and training.metrics overrides, not {key!r} (it "
                "would have no effect)"
            )
    if args.max_batches is not None and args.max_batches < 1:
        raise BitNetError(f"--max-batches={args.max_batches} is invalid: expected an integer >= 1")
    if args.generation:  # checked before the (possibly long) evaluation, one line at a time
        for _ in read_pairs(args.generation):
            pass
    cfg, model, tokenizer, ckpt = recipe.load_run(args.checkpoint, args.overrides)
    contrastive = cfg.loss.objective == "contrastive"
    if args.generation and contrastive:
        raise BitNetError("--generation scores a language model; this run is contrastive")
    cfg.training.eval_steps = None  # the whole evaluation set, unless --max-batches
    val = build_eval_dataset(cfg.data, tokenizer)
    if val is None and not args.generation:
        hint = (
            "the shards have no validation split (preprocess --val-fraction)"
            if cfg.data.source == "shards"
            else "the data has no validation text"
        )
        raise BitNetError(f"nothing to evaluate: {hint}; set data.val_files=FILE[,FILE...]")
    sys.stdout.write(f"checkpoint   {ckpt}\n")
    if val is not None:
        # loggers stay idle outside train()
        trainer = Trainer(model, cfg.training, None, val, loss_fn=recipe.eval_loss(cfg))
        m = trainer.evaluate(max_batches=args.max_batches)
        bs = cfg.training.batch_size
        batches = -(-len(val) // bs)
        used = min(batches, args.max_batches or batches)
        what = "pairs" if contrastive else "windows"
        sys.stdout.write(
            f"evaluated    {min(len(val), used * bs)} of {len(val)} {what} ({used} batches)\n"
        )
        if contrastive:
            sys.stdout.write(f"val loss     {m['val_loss']:.4f} (InfoNCE)\n")
        else:
            sys.stdout.write(
                f"val loss     {m['val_loss']:.4f}\n"
                f"perplexity   {m['val_perplexity']:.2f}\n"
                f"bits/byte    {m.get('val_bits_per_byte', float('nan')):.4f}\n"
            )
        shown = {"step", "val_loss", "val_perplexity", "val_bits_per_byte"}
        for name, value in m.items():  # training.metrics beyond the loss ones
            if name not in shown:
                sys.stdout.write(f"{name.removeprefix('val_'):<12} {value:.4f}\n")
    if args.generation:
        g = recipe.score_generations(model, tokenizer, args.generation, args.max_new_tokens)
        sys.stdout.write(
            f"generation   {g['pairs']} prompts of {args.generation}\n"
            f"bleu         {g['bleu']:.2f}\nchrf         {g['chrf']:.2f}\n"
        )
    return 0


def cmd_generate(args) -> int:
    cfg, model, tokenizer, _ = recipe.load_run(args.checkpoint)
    # The options are the run's `sample` settings, validated by their one declaration.
    given = {
        "prompt": args.prompt,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "seed": args.seed,
    }
    try:
        s = SampleConfig(
            **{**cfg.sample.to_dict(), **{k: v for k, v in given.items() if v is not None}}
        )
    except ConfigError as e:  # name the option the user typed
        option = "--" + e.field.split(".")[-1].replace("_", "-")
        raise ConfigError(option, e.value, e.allowed) from None
    text = recipe.generate_text(
        model, tokenizer, s.prompt, s.max_new_tokens, s.temperature, s.top_k, s.seed
    )
    sys.stdout.write(text + "\n")
    return 0


def cmd_merge(args) -> int:
    if args.max_batches < 1:
        raise BitNetError(f"--max-batches={args.max_batches} is invalid: expected an integer >= 1")
    report = recipe.merge_run(args.run, args.output, args.method, args.max_batches)
    lines = [f"merged       {os.path.abspath(args.output)}", f"method       {report.method}"]
    for how, m in report.measured.items():
        lines.append(
            f"{how:<12} held-out loss {m['loss']:.4f} (adapters separate "
            f"{m['unmerged_loss']:.4f}), max logit difference {m['max_logit_diff']:.2e}"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def cmd_plan(args) -> int:
    from .planner import Layout, parse_memory, plan, shape_overrides

    memory = parse_memory(args.device_memory) if args.device_memory else None
    layout = Layout(args.dp, args.fsdp, args.tp, args.pp)
    overrides = shape_overrides(args.shape) + list(args.overrides) if args.shape else args.overrides
    cfg = load_config(args.config, overrides)
    p = plan(cfg, layout, args.device, memory, args.pp_schedule, args.pp_microbatches)
    sys.stdout.write(p.table() + "\n")
    return 0


def cmd_consolidate(args) -> int:
    from .consolidate import consolidate_checkpoint

    written = consolidate_checkpoint(args.checkpoint, args.output)
    sys.stdout.write(f"consolidated {os.path.abspath(written)}\n")
    return 0


def cmd_export(args) -> int:
    from .export import export_run

    ckpt = export_run(
        args.run, args.output, args.format, args.linear_class, args.mode, args.dtype, args.gguf_type
    )
    kind = f"gguf {args.gguf_type}" if args.format == "gguf" else args.format
    sys.stdout.write(f"exported {ckpt} -> {os.path.abspath(args.output)} ({kind})\n")
    return 0


def cmd_plot(args) -> int:
    from .monitoring.plots import plot_runs

    out = args.output
    if out is None:
        first = args.runs[0]
        out = (
            os.path.join(first, "plots", "training.png")
            if len(args.runs) == 1
            else os.path.join(os.path.dirname(os.path.abspath(first)), "compare.png")
        )
    if not out.lower().endswith(".png"):
        raise BitNetError(f"--output {out!r} must name a .png file")
    sys.stdout.write(f"wrote        {os.path.abspath(plot_runs(args.runs, out))}\n")
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


def _rank() -> int:
    """This process's rank under torchrun (0 when not launched by it, or unreadable)."""
    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0  # a malformed variable is reported where the run reads it


def _configure_logging() -> None:
    """Messages to stderr. Under torchrun every rank runs the same code, so rank 0 speaks for
    the run: the other ranks show errors and the messages about themselves alone (logged with
    `extra={"every_rank": True}`, such as a signal only they received), prefixed with their
    rank, and no Python warnings. BITNET_TRAINING_LOG_ALL_RANKS=1 shows everything."""
    rank = _rank()
    every = os.environ.get("BITNET_TRAINING_LOG_ALL_RANKS", "") not in ("", "0")
    prefix = f"[rank {rank}] " if rank else ""
    logging.basicConfig(level=logging.INFO, format=prefix + "%(message)s", stream=sys.stderr)
    if rank and not every:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_own_messages)
        warnings.simplefilter("ignore")


def _own_messages(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or getattr(record, "every_rank", False)


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
    _configure_logging()
    commands = {
        "train": cmd_train,
        "eval": cmd_eval,
        "generate": cmd_generate,
        "merge": cmd_merge,
        "consolidate": cmd_consolidate,
        "plan": cmd_plan,
        "export": cmd_export,
        "plot": cmd_plot,
        "preprocess": cmd_preprocess,
    }
    try:
        code = commands[args.command](args)
    except BitNetError as e:
        rank = _rank()
        sys.stderr.write(f"{f'[rank {rank}] ' if rank else ''}bitnet-train: error: {e}\n")
        code = 2
    except KeyboardInterrupt:  # a second Ctrl-C: exit at once
        sys.stderr.write("bitnet-train: interrupted\n")
        code = 130
    if args.command == "train" and launched_world_size() > 1:
        # A worker of several processes (its checkpoints fsynced, logs closed) leaves without
        # the interpreter's teardown: gloo's destructors were seen to abort there under load
        # ("terminate called without an active exception", SIGABRT), which torchrun reports
        # as a failed worker, and with --max-restarts would restart a finished run.
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
