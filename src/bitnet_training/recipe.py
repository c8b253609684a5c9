"""The recipe: the order of things in a training run, read top to bottom.

    model     = a preset, a pretrained model (`model.pretrained`), or a run's weights
    model     = quantize(model)      norms placed, nn.Linear -> BitLinear     (nn/)
    model     = adapters(model)      PEFT, base frozen         (arrives with its issue)
    model     = parallelize(model)   PP split, TP, activation checkpointing, FSDP / DDP,
                                     in torchtitan's order     (arrives with its issue)
    optimizer = over the trainable parameters; the schedule over the run's steps
    Trainer(model, ..., optimizer=..., callbacks=...).train()  ->  summary

The CLI parses arguments, calls `train` / `load_run` and prints. Python users can call the
same steps (`load_model`, `apply_transforms`, `build_callbacks`, `prepare`) and change any
piece before `Trainer.train()`. Callbacks are assembled in one place, `build_callbacks`;
what a transform needs per step (quantization's step clock) its modules declare themselves.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .callback import Callback
from .config import RunConfig, apply_override, config_from_dict
from .data import Datasets, build_datasets, tokenizer_for, tokenizer_id
from .errors import BitNetError
from .models import BitNetLM
from .nn import BitLinear, MultiStage, QuantizationTuner, TernaryDiagnostics, quantize_model
from .optim import build_optimizer
from .train import ProgressBar, Trainer, TrainResult, list_checkpoints
from .train import checkpoint as ckpt_io

log = logging.getLogger("bitnet_training")


# ------------------------------------------------------------------- 1. the model
def load_model(cfg: RunConfig) -> tuple[nn.Module, object | None, list[str]]:
    """The full-precision model `cfg` describes, initialized under `training.seed`: the
    `model_preset` shape with `model.*` overrides (a `BitNetLM` with plain `nn.Linear`s).
    Returns (model, the model's own tokenizer or None, notes for the log)."""
    torch.manual_seed(cfg.training.seed)
    model = BitNetLM(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    return model, None, [f"model: {cfg.model_preset}, {n / 1e6:.2f} M parameters"]


# -------------------------------------------------------------- 2. the transforms
def apply_transforms(model: nn.Module, cfg: RunConfig) -> list[str]:
    """Apply the run's model transforms in their fixed order, in place: quantization (with
    the chosen norm placement), then adapters, then parallelism (the last two arrive with
    their issues). Returns notes for the log."""
    notes = []
    if cfg.quantize:
        report = quantize_model(model, cfg.qat)
        notes.append(f"quantize: {report}".splitlines()[0])
    return notes


def weight_bits_in_force(model: nn.Module) -> str:
    """What the model's quantized layers use now: e.g. `1.58-bit weights / 8-bit
    activations`, with lambda when progressive quantization has not finished, or `full
    precision` when nothing is quantized."""
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    if not layers:
        return "full precision (no quantized layers)"
    kinds = set()
    for m in layers:
        w, a = m.weight_spec(), m.config.activation_spec()
        text = f"{w.bits if w else 'fp'}-bit weights / {a.bits if a else 'fp'}-bit activations"
        if m.weight_blend < 1 or m.activation_blend < 1:
            text += f" (lambda {m.weight_blend:.2f} / {m.activation_blend:.2f})"
        kinds.add(text)
    return f"BitNet {', '.join(sorted(kinds))} in {len(layers)} layers"


# ------------------------------------------------------------------ 3. callbacks
class Announce(Callback):
    """Logs the run's notes once training starts (after a resume is checked, so an error
    stays one line)."""

    order = -100

    def __init__(self, lines: list[str]):
        self.lines = lines

    def on_train_begin(self, trainer):
        if trainer.is_main:
            for line in self.lines:
                log.info("%s", line)


def build_callbacks(cfg: RunConfig, notes: list[str], progress: bool = True) -> list[Callback]:
    """The one place a run's callbacks are assembled: the announcement, the progress bar,
    and for quantized runs the stages, the quantization tuner and the ternary diagnostics.
    (The QAT step clock, latent clipping and weight-decay groups are declared by the
    quantized layers themselves; the loop's own callbacks are the Trainer's defaults.)"""
    callbacks: list[Callback] = [Announce(notes)]
    if progress:
        callbacks.append(ProgressBar())
    if cfg.quantize:
        if cfg.stages:
            callbacks.append(MultiStage(cfg.stages, cfg.qat))
        if cfg.qat_tuner is not None:
            callbacks.append(QuantizationTuner(cfg.qat_tuner))
        if cfg.diagnostics:
            callbacks.append(TernaryDiagnostics())
    return callbacks


# ------------------------------------------------------------------ the whole run
@dataclass
class Run:
    """What `prepare` built: the config, model, tokenizer, data and the ready Trainer."""

    config: RunConfig
    model: nn.Module
    tokenizer: object
    data: Datasets
    trainer: Trainer
    notes: list[str] = field(default_factory=list)


def prepare(
    cfg: RunConfig, resume: str | None = None, overwrite: bool = False, progress: bool = True
) -> Run:
    """Every step before training: check the output directory (and the checkpoint when
    resuming), build the data with the model's tokenizer, the model and its transforms,
    the optimizer, the callbacks and the Trainer."""
    _absolute_paths(cfg)
    out = cfg.training.output_dir
    prepare_output_dir(out, resume, overwrite)
    if resume is not None:
        _check_resumable(cfg, out if resume == "latest" else resume)
    model, own_tokenizer, notes = load_model(cfg)
    tokenizer = own_tokenizer or tokenizer_for(cfg.data)
    check_vocab(model, tokenizer)
    if resume is not None:
        check_tokenizer(out if resume == "latest" else resume, tokenizer)
    t0 = time.perf_counter()
    data = build_datasets(cfg.data, tokenizer, cfg.training.seed)
    notes.insert(0, _describe(cfg, data, time.perf_counter() - t0))
    notes += apply_transforms(model, cfg)
    if cfg.init_from and resume is None:
        notes.append(_init_from(model, cfg.init_from, tokenizer))
    optimizer = build_optimizer(model, cfg.training.optimizer, cfg.training.learning_rate)
    metadata = {
        "run_config": cfg.to_dict(),
        "data": data.info,
        "tokenizer_id": tokenizer_id(tokenizer),
    }
    trainer = Trainer(
        model,
        cfg.training,
        data.train,
        data.val,
        build_callbacks(cfg, notes, progress),
        metadata,
        optimizer=optimizer,
    )
    return Run(cfg, model, tokenizer, data, trainer, notes)


def train(
    cfg: RunConfig, resume: str | None = None, overwrite: bool = False, progress: bool = True
) -> tuple[Run, TrainResult]:
    """`prepare` the run and train it (from checkpoint `resume`, "latest" for the output
    directory's newest). Returns the run and the `TrainResult`."""
    run = prepare(cfg, resume, overwrite, progress)
    return run, run.trainer.train(resume_from=resume)


def load_run(path: str, overrides: list[str] = ()) -> tuple[RunConfig, nn.Module, object, str]:
    """The run config (with `overrides` applied), trained model, tokenizer and checkpoint
    directory of a run or checkpoint `path`, for evaluation and generation."""
    ckpt = ckpt_io.resolve_checkpoint(path)
    ckpt_io.read_state(ckpt)  # checks the format version
    data = ckpt_io.read_metadata(ckpt).get("run_config")
    if not isinstance(data, dict):
        raise BitNetError(f"checkpoint {ckpt!r} has no run config (not written by bitnet-train)")
    for item in overrides:
        apply_override(data, item)
    cfg = config_from_dict(data)
    model, own_tokenizer, _ = load_model(cfg)
    apply_transforms(model, cfg)
    ckpt_io.load_model_weights(model, ckpt)
    tokenizer = own_tokenizer or tokenizer_for(cfg.data)
    check_tokenizer(ckpt, tokenizer)
    return cfg, model, tokenizer, ckpt


# ----------------------------------------------------------------------- checks
def check_vocab(model: nn.Module, tokenizer) -> None:
    """Refuse a tokenizer with more tokens than the model has embedding rows."""
    rows = (
        model.get_input_embeddings().num_embeddings
        if hasattr(model, "get_input_embeddings")
        else model.config.vocab_size
    )
    if tokenizer.vocab_size > rows:
        raise BitNetError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocabulary has "
            f"{rows}: set model.vocab_size >= {tokenizer.vocab_size}"
        )


def check_tokenizer(path: str, tokenizer) -> None:
    """Refuse to use a checkpoint under another tokenizer than the one it was trained with."""
    ckpt = ckpt_io.resolve_checkpoint(path)
    saved = ckpt_io.read_metadata(ckpt).get("tokenizer_id")
    ours = tokenizer_id(tokenizer)
    if saved is not None and saved != ours:
        raise BitNetError(
            f"checkpoint {ckpt!r} was trained with tokenizer {saved}, this data uses {ours}: "
            "evaluate and resume with data of the same tokenizer"
        )


def _check_resumable(cfg: RunConfig, path: str) -> None:
    """Refuse a resume whose checkpoint was trained as another kind of model."""
    ckpt = ckpt_io.resolve_checkpoint(path)
    old = ckpt_io.read_metadata(ckpt).get("run_config")
    if not isinstance(old, dict):
        return  # not written by the recipe: the Trainer's own checks still apply
    if old.get("quantize") != cfg.quantize:
        raise BitNetError(
            f"checkpoint {ckpt!r} was trained with quantize={str(old.get('quantize')).lower()}; "
            f"this run has quantize={str(cfg.quantize).lower()}"
        )
    if old.get("qat") != cfg.to_dict()["qat"] and cfg.quantize:
        log.warning("resuming with QAT settings that differ from the checkpoint's")


def prepare_output_dir(out: str, resume: str | None, overwrite: bool) -> None:
    """Refuse to mix runs in one directory: an output directory that holds checkpoints or
    logs needs `resume` (continue) or `overwrite` (which deletes them first)."""
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


def _absolute_paths(cfg: RunConfig) -> None:
    """Data and model paths as absolute paths, so a run's stored config works from anywhere."""
    d = cfg.data
    d.train_files = [os.path.abspath(f) for f in d.train_files]
    d.val_files = [os.path.abspath(f) for f in d.val_files]
    if d.shards_dir:
        d.shards_dir = os.path.abspath(d.shards_dir)
    if cfg.init_from:
        cfg.init_from = os.path.abspath(cfg.init_from)


def _init_from(model: nn.Module, path: str, tokenizer) -> str:
    """Load another run's weights into `model` (after its transforms): how a trained
    full-precision run is converted. Quantizer state (observer ranges, LSQ scales) starts
    afresh: a full-precision checkpoint has none."""
    init = ckpt_io.resolve_checkpoint(path)
    check_tokenizer(init, tokenizer)
    ckpt_io.load_model_weights(
        model, init, may_miss=lambda k: "act_observer." in k or "act_scale" in k
    )
    return f"init: weights from {init}"


def _describe(cfg: RunConfig, data: Datasets, seconds: float) -> str:
    if cfg.data.source == "stream":
        return f"data: streaming {data.info['train_files']} files (read lazily)"
    return (
        f"data: {data.info['source']}, {data.info['train_tokens']} training and "
        f"{data.info['val_tokens']} validation tokens (fingerprint "
        f"{data.info['fingerprint']}, {seconds:.1f} s)"
    )
