"""The recipe: the order of things in a training run, read top to bottom.

    model     = a preset, a pretrained model (`model.pretrained`), or a run's weights
    model     = quantize(model)      norms placed, nn.Linear -> BitLinear     (nn/)
    model     = adapters(model)      PEFT, base frozen         (arrives with its issue)
    model     = parallelize(model)   PP split, TP, activation checkpointing, FSDP / DDP,
                                     in torchtitan's order     (arrives with its issue)
    optimizer = over the trainable parameters; the schedule over the run's steps
    Trainer(model, ..., optimizer=..., callbacks=...).train()  ->  summary

The CLI parses arguments, calls `train` / `load_run` and prints. Python users can call the
same steps (`load_model`, `apply_transforms` or `build_model`, `build_callbacks`, `prepare`)
and change any
piece before `Trainer.train()`. Callbacks are assembled in one place, `build_callbacks`;
what a transform needs per step (quantization's step clock) its modules declare themselves.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import default_collate

from .atomic import atomic_directory
from .callback import Callback
from .config import RunConfig, apply_override, config_from_dict, migrate_stored
from .data import Datasets, build_datasets, build_eval_dataset, tokenizer_for, tokenizer_id
from .data.hf_tokenizer import PretrainedTokenizer, has_tokenizer_files
from .distributed import apply_activation_checkpointing
from .distributed.ddp import init_from_env, launched_world_size
from .distributed.elastic import JOB_FILE, mark_job, restart_plan
from .distributed.layout import apply_layout
from .distributed.wrappers import full_state_dict, unwrap
from .errors import BitNetError
from .loss import ContrastiveLoss, DistillLoss, LMLoss, Penalty
from .metrics import GenerationScores, read_pairs
from .models import BitNetLM
from .models.export_targets import check_target
from .models.pretrained import (
    Pretrained,
    build_from_base,
    fingerprint,
    load_pretrained,
    save_base_files,
)
from .nn import BitLinear, MultiStage, QuantizationTuner, TernaryDiagnostics, quantize_model
from .nn.subln import insert_subln
from .optim import build_optimizer
from .peft import PEFTConfig, PEFTReport, apply_peft, save_adapter
from .peft.merge import MergeReport, merge_lora
from .peft.nf4 import nf4_round_trip
from .peft.packed import PackedTernaryLinear
from .train import CheckpointIO, ProgressBar, Trainer, TrainResult, list_checkpoints
from .train import checkpoint as ckpt_io
from .train.precision import resolve_device
from .train.sharded import SHARDED_DIR, is_dtensor_model, is_sharded

log = logging.getLogger("bitnet_training")


# ------------------------------------------------------------------- 1. the model
@dataclass
class Loaded:
    """What `load_model` built: the full-precision model, the model's own tokenizer (None:
    the data source's), the pretrained base to copy into the run (None for presets and
    rebuilt bases), and notes for the log."""

    model: nn.Module
    tokenizer: object | None = None
    base: Pretrained | None = None
    notes: list[str] = field(default_factory=list)
    fingerprint: str | None = None  # of the base's weights (a pretrained model or a run's)


def load_model(cfg: RunConfig, run_dir: str | None = None) -> Loaded:
    """The full-precision model `cfg` describes, initialized under `training.seed`.

    Without `model.pretrained`: the `model_preset` shape with `model.*` overrides (a
    `BitNetLM` with plain `nn.Linear`s). With it: a `transformers` directory, a GGUF file or
    a `transformers` BitNet checkpoint (`load_pretrained`), with its own tokenizer; or a run
    or checkpoint of ours (its model, weights loaded, layers back to plain `nn.Linear`).
    When `run_dir` holds the run's copy of its base (`base/`, written at its start), the
    architecture is rebuilt from that copy (the weights come from the run's checkpoint), so
    evaluation, generation and resume need only the run directory.
    """
    torch.manual_seed(cfg.training.seed)
    src = cfg.model.pretrained
    if not src:
        model = BitNetLM(cfg.model)
        n = sum(p.numel() for p in model.parameters())
        return Loaded(model, notes=[f"model: {cfg.model_preset}, {n / 1e6:.2f} M parameters"])
    base_dir = os.path.join(run_dir, "base") if run_dir else None
    if base_dir and os.path.isfile(os.path.join(base_dir, "run_config.json")):
        return _rebuild_our_run(base_dir)
    if base_dir and os.path.isfile(os.path.join(base_dir, "source.json")):
        model = build_from_base(base_dir)
        tok = PretrainedTokenizer(base_dir) if has_tokenizer_files(base_dir) else None
        return Loaded(model, tok, notes=[f"model: {src} (architecture from {base_dir})"])
    if _is_run(src):
        return _load_our_run(src)
    p = load_pretrained(src, requantizable=cfg.quantize)
    n = sum(q.numel() for q in p.model.parameters())
    note = f"model: {p.kind} {p.source} ({n / 1e6:.2f} M parameters, base {p.fingerprint})"
    return Loaded(p.model, p.tokenizer, p, [note], p.fingerprint)


def _is_run(path: str) -> bool:
    """Whether `path` is a run directory or checkpoint of ours (not a pretrained model)."""
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return False
    return os.path.isfile(os.path.join(path, ckpt_io.STATE_FILE)) or bool(list_checkpoints(path))


def _load_our_run(path: str) -> Loaded:
    """A run (or checkpoint) of ours as a base: its model built as that run built it, its
    weights loaded, then every `BitLinear` turned back into a plain `nn.Linear` with the same
    latent weights, so this run's transforms apply afresh (quantizer state is dropped)."""
    ckpt = ckpt_io.resolve_checkpoint(path)
    stored = ckpt_io.read_metadata(ckpt).get("run_config")
    if not isinstance(stored, dict):
        raise BitNetError(f"checkpoint {ckpt!r} has no run config (not written by bitnet-train)")
    old = config_from_dict(migrate_stored(stored))
    if old.peft.method != "none":
        raise BitNetError(
            f"model.pretrained={path!r} is a {old.peft.method} run (adapters beside a frozen "
            "base): merge it first (bitnet-train merge RUN -o DIR) and start from the merge"
        )
    if old.quantize and old.qat.norm_placement == "input":
        raise BitNetError(
            f"model.pretrained={path!r} was trained with qat.norm_placement=input, whose "
            "norms live inside its quantized layers: start from it with init_from instead"
        )
    loaded = load_model(old, run_dir=os.path.dirname(ckpt))
    quantize(loaded.model, old)
    CheckpointIO().load_model(loaded.model, ckpt)
    _plain_linears(loaded.model)
    loaded.notes = [f"model: the weights of {ckpt}"]
    loaded.base = None
    loaded.fingerprint = _run_fingerprint(ckpt)
    return loaded


def _run_fingerprint(ckpt: str) -> str:
    """The fingerprint of a checkpoint's weights (its single file, or its shards), as a
    pretrained base's is made."""
    if is_sharded(ckpt):
        shards = os.path.join(ckpt, SHARDED_DIR)
        return fingerprint(sorted(os.path.join(shards, f) for f in os.listdir(shards)))
    return fingerprint([os.path.join(ckpt, ckpt_io.MODEL_FILE)])


def _rebuild_our_run(base_dir: str) -> Loaded:
    """The architecture of a run-of-ours base from the run's copy of it (`base/run_config.json`
    and, when that run had a base itself, `base/base/`); the weights come from the checkpoint."""
    with open(os.path.join(base_dir, "run_config.json")) as f:
        old = config_from_dict(migrate_stored(json.load(f)))
    loaded = load_model(old, run_dir=base_dir)
    quantize(loaded.model, old)
    _plain_linears(loaded.model)
    loaded.notes, loaded.base = [f"model: architecture from {base_dir}"], None
    return loaded


def save_run_base(path: str, out: str) -> None:
    """Copy what rebuilds a run-of-ours base (its stored run config, and its own base copy)
    into `<out>/base/`, so the new run needs only itself."""
    ckpt = ckpt_io.resolve_checkpoint(path)
    with atomic_directory(os.path.join(out, "base")) as tmp:
        with open(os.path.join(tmp, "run_config.json"), "w") as f:
            json.dump(ckpt_io.read_metadata(ckpt)["run_config"], f, indent=1)
        with open(os.path.join(tmp, "source.json"), "w") as f:
            info = {"kind": "run", "source": ckpt, "fingerprint": _run_fingerprint(ckpt)}
            json.dump(info, f, indent=1)
        theirs = os.path.join(os.path.dirname(ckpt), "base")
        if os.path.isdir(theirs):
            shutil.copytree(theirs, os.path.join(tmp, "base"))


def _same_base(run_dir: str, fingerprint: str) -> None:
    """Refuse a base whose weights changed since the PEFT run in `run_dir` started (its
    adapters were trained against the recorded fingerprint)."""
    path = os.path.join(run_dir, "base", "source.json")
    if os.path.isfile(path):
        with open(path) as f:
            recorded = json.load(f).get("fingerprint")
        if recorded and recorded != fingerprint:
            raise BitNetError(
                f"the base model changed since this run started (fingerprint {fingerprint}, "
                f"the run's adapters were trained on {recorded})"
            )


def _plain_linears(model: nn.Module) -> None:
    """Replace each `BitLinear` by an `nn.Linear` holding the same weight and bias tensors."""
    for name, m in list(model.named_modules()):
        if isinstance(m, BitLinear):
            lin = nn.Linear(m.in_features, m.out_features, m.bias is not None, device="meta")
            lin.weight, lin.bias = m.weight, m.bias
            model.set_submodule(name, lin)


# -------------------------------------------------------------- 2. the transforms
def quantize(model: nn.Module, cfg: RunConfig) -> list[str]:
    """Transform 1, in place: the chosen norm placement, then `quantize_model` (when
    `quantize` is on). Returns notes for the log."""
    notes = []
    if cfg.quantize:
        if cfg.qat.norm_placement == "subln":
            added = insert_subln(model)
            notes.append(f"subln: {len(added)} sub-norms inserted" if added else "subln: present")
        report = quantize_model(model, cfg.qat)
        notes.append(f"quantize: {report}".splitlines()[0])
    return notes


def adapters(model: nn.Module, cfg: RunConfig) -> tuple[nn.Module, PEFTReport]:
    """Transform 2: PEFT (`peft.method`); the base freezes and the returned model (possibly
    a `peft` wrapper around `model`) is what trains."""
    if cfg.peft.method == "qlora_ternary" and not cfg.quantize:
        raise BitNetError("peft.method=qlora_ternary needs quantize=true (a ternary base)")
    if cfg.peft.method == "qlora" and cfg.quantize:
        raise BitNetError(
            "peft.method=qlora needs quantize=false (it stores a full-precision base in NF4); "
            "for a ternary base use peft.method=qlora_ternary"
        )
    if cfg.peft.init == "pissa" and cfg.quantize:
        raise BitNetError(
            "peft.init=pissa needs quantize=false: PiSSA moves the principal part of W into the "
            "adapter, which a quantized base Q(W) does not keep"
        )
    return apply_peft(model, cfg.peft)


def apply_transforms(model: nn.Module, cfg: RunConfig) -> tuple[nn.Module, list[str]]:
    """Apply the run's model transforms in their fixed order: quantization (with the chosen
    norm placement), adapters, then parallelism (pipeline split, tensor parallel, activation
    checkpointing, FSDP / DDP: arrives with its issue). Returns the model to train and notes."""
    notes = quantize(model, cfg)
    model, report = adapters(model, cfg)
    if report.method != "none":
        notes.append(f"peft: {report}")
    model, more = parallelize(model, cfg)
    return model, notes + more


def parallelize(
    model: nn.Module, cfg: RunConfig, data_parallel: bool = True
) -> tuple[nn.Module, list[str]]:
    """Transform 3, in torchtitan's order: activation checkpointing, then the layout over
    the process group's ranks when it has several (`distributed.layout.apply_layout`: tensor
    parallel, then DDP or FSDP2; or pipeline stages). Returns the model to train (possibly
    wrapped, or this rank's pipeline stage)."""
    notes = []
    if cfg.training.activation_checkpointing:
        n = apply_activation_checkpointing(model)
        notes.append(f"activation checkpointing: {n} blocks")
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    world = torch.distributed.get_world_size() if dist else 1
    if cfg.distributed.fsdp_ternary_all_gather:
        _check_packable(cfg)
    per = cfg.distributed.pp_microbatches or world
    if cfg.distributed.strategy == "pp" and cfg.training.batch_size % per:
        raise BitNetError(
            f"training.batch_size={cfg.training.batch_size} does not split into the pipeline's "
            f"{per} micro-batches (distributed.pp_microbatches): use a multiple of {per}"
        )
    if world > 1 and data_parallel:
        t = cfg.training
        device = resolve_device(t.device)
        model, how, world = apply_layout(model, cfg.distributed, device, cfg.peft.method)
        notes.append(
            f"parallel: {how} ({torch.distributed.get_backend()}); global batch "
            f"{t.batch_size} per data-parallel rank x {t.gradient_accumulation_steps} "
            f"accumulation x {world} data-parallel rank{'s' if world > 1 else ''} = "
            f"{t.batch_size * t.gradient_accumulation_steps * world} sequences"
        )
    return model, notes


def _check_packable(cfg: RunConfig) -> None:
    """Refuse `distributed.fsdp_ternary_all_gather` where the weights are not plainly
    ternary for the whole run (the per-layer settings are checked on the layers)."""
    why = (
        "quantize=false trains full-precision weights" if not cfg.quantize
        else "stages change the quantizer during the run" if cfg.stages
        else "qat_tuner changes the quantizer during the run" if cfg.qat_tuner is not None
        else f"peft.method={cfg.peft.method} freezes the weights it would pack"
        if cfg.peft.method != "none"
        else None
    )  # fmt: skip
    if why:
        raise BitNetError(
            f"distributed.fsdp_ternary_all_gather needs plainly ternary weights: {why}"
        )


def init_distributed(cfg: RunConfig) -> tuple[int, int]:
    """Join the process group `torchrun` launched this process into (several processes),
    with `distributed.backend`; (0, 1) alone. `distributed.strategy=none` with several
    processes, or `ddp` with one, is refused (they would train apart, or not in parallel)."""
    launched = launched_world_size()
    strategy = cfg.distributed.strategy
    if launched > 1 and strategy == "none":
        raise BitNetError(
            f"distributed.strategy=none, but torchrun launched {launched} processes: they "
            "would each train alone (use ddp, or auto)"
        )
    if launched <= 1 and strategy in ("ddp", "fsdp", "tp", "pp", "fsdp+tp"):
        raise BitNetError(
            f"distributed.strategy={strategy} needs several processes: launch with torchrun "
            "--nproc-per-node=N (one process trains alone)"
        )
    if launched <= 1 and cfg.distributed.gradient_compression != "none":
        raise BitNetError(
            f"distributed.gradient_compression={cfg.distributed.gradient_compression} acts "
            "only under torchrun with several processes"
        )
    if launched <= 1 and cfg.distributed.backend != "auto":
        raise BitNetError(
            f"distributed.backend={cfg.distributed.backend} acts only under torchrun with "
            "several processes"
        )
    return init_from_env(cfg.distributed.backend, resolve_device(cfg.training.device))


@dataclass
class Built:
    """The model `build_model` made, its tokenizer, the base to copy into the run (or None),
    the PEFT report, and notes for the log."""

    model: nn.Module
    tokenizer: object
    base: Pretrained | None
    report: PEFTReport
    notes: list[str]


def build_model(
    cfg: RunConfig, run_dir: str | None = None, init: bool = True, train: bool = False
) -> Built:
    """Steps 1 and 2: load the model, quantize it, load `init_from`'s weights (when `init`),
    apply the adapters, then the parallel layout (data parallelism only when `train`: a model
    loaded to evaluate, generate, merge or teach is not wrapped). A PEFT run's checkpoints
    hold only its adapters, so its base (with `init_from`) is loaded again from its source,
    weights and all, when it is resumed, evaluated or merged (the run's `base/` copy holds
    the architecture, not the weights)."""
    peft_run = cfg.peft.method != "none"
    loaded = load_model(cfg, None if peft_run else run_dir)
    if peft_run and run_dir and loaded.fingerprint is not None:
        _same_base(run_dir, loaded.fingerprint)
    model, notes = loaded.model, loaded.notes
    tokenizer = loaded.tokenizer or tokenizer_for(cfg.data)
    notes += quantize(model, cfg)
    if cfg.init_from and (init or cfg.peft.method != "none"):
        notes.append(_init_from(model, cfg.init_from, tokenizer))
    model, report = adapters(model, cfg)
    if report.method != "none":
        notes.append(f"peft: {report}")
    model, more = parallelize(model, cfg, data_parallel=train)
    return Built(model, tokenizer, loaded.base, report, notes + more)


def weight_bits_in_force(model: nn.Module) -> str:
    """What the model's quantized layers use now: e.g. `1.58-bit weights / 8-bit
    activations`, with lambda when progressive quantization has not finished, or `full
    precision` when nothing is quantized."""
    layers = [m for m in model.modules() if isinstance(m, BitLinear | PackedTernaryLinear)]
    nf4 = sum(1 for m in model.modules() if getattr(m, "quant_state", None) is not None)
    if not layers:
        # bitsandbytes' 4-bit weights carry a quant_state (a QLoRA base)
        return f"NF4 frozen base in {nf4} layers" if nf4 else "full precision (no quantized layers)"
    kinds = set()
    for m in layers:
        if isinstance(m, PackedTernaryLinear):  # a frozen packed ternary base
            a = m.config.activation_spec()
            kinds.add(f"1.58-bit packed weights / {a.bits if a else 'fp'}-bit activations")
            continue
        w, a = m.weight_spec(), m.config.activation_spec()
        weights = f"{w.bits}-bit weights" if w else "full-precision weights"
        text = f"{weights} / {a.bits if a else 'fp'}-bit activations"
        if m.weight_blend < 1 or m.activation_blend < 1:
            text += f" (lambda {m.weight_blend:.2f} / {m.activation_blend:.2f})"
        kinds.add(text)
    where = ""
    pipe = getattr(model, "pipeline", None)
    if pipe is not None:  # this rank's stage only
        where = f" of pipeline stage {pipe.stage_index + 1}/{pipe.n_stages}"
    return f"BitNet {', '.join(sorted(kinds))} in {len(layers)} layers{where}"


# ------------------------------------------------------------------ 3. callbacks
class StartRun(Callback):
    """What happens to the output directory once every check has passed (the Trainer's
    setup and a resume included, so a refused run changes nothing): with `overwrite` the
    previous run's checkpoints and logs go, the base is copied in (`base/`), and the run's
    notes are logged. Rank 0 only."""

    order = -100

    def __init__(self, lines: list[str], overwrite: bool = False, base=None):
        self.lines, self.overwrite, self.base = lines, overwrite, base

    def on_train_begin(self, trainer):
        if not trainer.is_main:
            return
        out = trainer.config.output_dir
        if self.overwrite:
            clear_output_dir(out)
        mark_job(out)  # a torchrun restart of this job resumes here by itself
        if isinstance(self.base, Pretrained):
            save_base_files(self.base, out)
        elif isinstance(self.base, str):  # a run of ours
            save_run_base(self.base, out)
        for line in self.lines:
            log.info("%s", line)


def build_callbacks(
    cfg: RunConfig, notes: list[str], progress: bool = True, start: StartRun | None = None
) -> list[Callback]:
    """The one place a run's callbacks are assembled: the start of the run, the progress bar,
    the L1 / L2 penalties, and for quantized runs the stages, the quantization tuner and the
    ternary diagnostics.
    (The QAT step clock, latent clipping and weight-decay groups are declared by the
    quantized layers themselves; the loop's own callbacks are the Trainer's defaults.)"""
    callbacks: list[Callback] = [start or StartRun(notes)]
    if progress:
        callbacks.append(ProgressBar())
    if cfg.loss.l1 or cfg.loss.l2:
        callbacks.append(Penalty(cfg.loss.l1, cfg.loss.l2, cfg.loss.penalty_params))
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
    resume: str | None = None  # the checkpoint to start from (a torchrun restart's own)


def prepare(
    cfg: RunConfig, resume: str | None = None, overwrite: bool = False, progress: bool = True
) -> Run:
    """Every step before training: check the output directory (and the checkpoint when
    resuming), build the data with the model's tokenizer, the model and its transforms,
    the optimizer, the callbacks and the Trainer."""
    _absolute_paths(cfg)
    init_distributed(cfg)
    out = cfg.training.output_dir
    resume, overwrite, restarted = restart_plan(out, resume, overwrite)  # torchrun restarts
    if restarted:
        log.warning("%s", restarted)
    check_output_dir(out, resume, overwrite)
    if resume is not None:
        _check_resumable(cfg, out if resume == "latest" else resume)
    if cfg.training.optimizer.paged and resolve_device(cfg.training.device).type != "cuda":
        raise BitNetError(
            "training.optimizer.paged=true needs a CUDA GPU: paging moves optimizer states "
            "between GPU and CPU memory, and this run trains on "
            f"{resolve_device(cfg.training.device).type} (turn it off)"
        )
    run_dir = out if resume is not None else None
    built = build_model(cfg, run_dir=run_dir, init=resume is None, train=True)
    model, notes, tokenizer = built.model, built.notes, built.tokenizer
    check_target(unwrap(model), cfg.export_target)  # before any training
    check_vocab(unwrap(model), tokenizer)
    check_seq_len(unwrap(model), cfg.data.seq_len)
    if cfg.data.source == "shards" and cfg.model.pretrained:
        _same_tokenizer(tokenizer_for(cfg.data), tokenizer, cfg.data.shards_dir)
    if resume is not None:
        check_tokenizer(out if resume == "latest" else resume, tokenizer)
    elif _is_run(cfg.model.pretrained or ""):
        check_tokenizer(cfg.model.pretrained, tokenizer)
    t0 = time.perf_counter()
    data = build_datasets(cfg.data, tokenizer, cfg.training.seed)
    notes.insert(0, _describe(cfg, data, time.perf_counter() - t0))
    if cfg.data.source == "files" and data.val is None and cfg.data.val_fraction > 0:
        log.warning(
            "data.val_fraction=%g left no validation text: the training files hold too few "
            "documents to split (documents are split whole); set data.val_files",
            cfg.data.val_fraction,
        )
    optimizer = build_optimizer(model, cfg.training.optimizer, cfg.training.learning_rate)
    loss_fn = build_loss(cfg, model, tokenizer)
    if isinstance(loss_fn, DistillLoss):
        notes.append(f"distillation from {cfg.teacher.pretrained}")
    metadata = {
        "run_config": cfg.to_dict(),
        "data": data.info,
        "tokenizer_id": tokenizer_id(tokenizer),
    }
    base = None  # what the run copies of its base, so eval / generate / resume need only it
    if resume is None and built.base is not None:
        base = built.base
        metadata["base"] = {
            "kind": base.kind,
            "source": base.source,
            "fingerprint": base.fingerprint,
        }
    elif resume is None and _is_run(cfg.model.pretrained):
        base = cfg.model.pretrained
    start = StartRun(notes, overwrite and resume is None, base)
    trainer = Trainer(
        model,
        cfg.training,
        data.train,
        data.val,
        build_callbacks(cfg, notes, progress, start),
        metadata,
        optimizer=optimizer,
        loss_fn=loss_fn,
        # A PEFT run's checkpoints hold what trains (adapters) and the optimizer state of it.
        checkpoint_io=CheckpointIO(
            trainable_only=cfg.peft.method != "none",
            sharded=is_dtensor_model(model) or getattr(model, "pipeline", None) is not None,
        ),
    )
    return Run(cfg, model, tokenizer, data, trainer, notes, resume)


def load_teacher(path: str, tokenizer) -> nn.Module:
    """The distillation teacher at `path`: a run or checkpoint of ours (its model as trained,
    quantized or adapted as it was), or anything `load_pretrained` takes. It must use
    `tokenizer` (the student's) when its own is known. Loading does not touch the global RNG
    (the student's initialization and data order stay as without a teacher)."""
    with torch.random.fork_rng(devices=[]):
        try:
            if _is_run(path):
                _, teacher, theirs, _ = load_run(path)
            else:
                p = load_pretrained(path)
                teacher, theirs = p.model, p.tokenizer
        except BitNetError as e:
            raise BitNetError(f"teacher.pretrained={path!r}: {e}") from None
    if theirs is not None and tokenizer_id(theirs) != tokenizer_id(tokenizer):
        raise BitNetError(
            f"teacher.pretrained={path!r} uses another tokenizer ({tokenizer_id(theirs)}) than "
            f"the student ({tokenizer_id(tokenizer)}): distillation needs the same vocabulary"
        )
    return teacher


def eval_loss(cfg: RunConfig):
    """The `loss_fn` that evaluates a run of `cfg`: InfoNCE for contrastive runs, else the
    plain cross-entropy (what every language-modelling objective is evaluated on)."""
    if cfg.loss.objective == "contrastive":
        return ContrastiveLoss(cfg.loss.temperature, cfg.loss.pooling)
    return LMLoss(cfg.loss)


def build_loss(cfg: RunConfig, model: nn.Module, tokenizer) -> LMLoss:
    """The run's `loss_fn`: cross-entropy (`loss.*`), with the distillation terms
    (`loss.distill.*`) against the frozen teacher when `teacher.pretrained` is set; or
    InfoNCE over paired text (`loss.objective=contrastive`, `data.source=pairs`)."""
    contrastive = cfg.loss.objective == "contrastive"
    if "token_accuracy" in cfg.training.metrics and (contrastive or cfg.loss.chunk_size):
        raise BitNetError(
            "training.metrics token_accuracy needs next-token logits: "
            + (
                "a contrastive run has none"
                if contrastive
                else "loss.chunk_size never makes them all (set loss.chunk_size=null)"
            )
        )
    if contrastive and cfg.training.batch_size * launched_world_size() < 2:
        raise BitNetError(
            "loss.objective=contrastive needs training.batch_size >= 2: the batch's other "
            "pairs are each pair's negatives"
        )
    if contrastive != (cfg.data.source == "pairs"):
        raise BitNetError(
            "loss.objective=contrastive and data.source=pairs go together (paired text is "
            f"what InfoNCE contrasts); this run has {cfg.loss.objective} and {cfg.data.source}"
        )
    if contrastive:
        if cfg.teacher.pretrained:
            raise BitNetError("teacher.pretrained distils a language model: not with contrastive")
        return ContrastiveLoss(cfg.loss.temperature, cfg.loss.pooling)
    if not cfg.teacher.pretrained:
        return LMLoss(cfg.loss)
    loss = DistillLoss(load_teacher(cfg.teacher.pretrained, tokenizer), cfg.loss)
    loss.check_student(model)
    return loss


def train(
    cfg: RunConfig, resume: str | None = None, overwrite: bool = False, progress: bool = True
) -> tuple[Run, TrainResult]:
    """`prepare` the run and train it (from checkpoint `resume`, "latest" for the output
    directory's newest). Returns the run and the `TrainResult`."""
    run = prepare(cfg, resume, overwrite, progress)
    result = run.trainer.train(resume_from=run.resume)
    if cfg.peft.method != "none":
        # The final adapter in peft's format (adapter_config.json + adapter_model.safetensors)
        whole = full_state_dict(run.model)  # gathered from FSDP shards: every rank calls
        if run.trainer.is_main:
            out = os.path.join(cfg.training.output_dir, "adapter")
            save_adapter(unwrap(run.model), out, state_dict=whole)
    return run, result


def merge_run(path: str, out: str, method: str = "auto", max_batches: int = 8) -> MergeReport:
    """Merge a LoRA run's adapters into its base (`peft.merge.merge_lora`, measured on up to
    `max_batches` held-out batches) and write the merged model to `out` as a full run that
    eval, generate and `model.pretrained` take. A 1.58-bit QLoRA run merges into its unpacked
    ternary base, a QLoRA run into the full-precision weights its NF4 base dequantizes to."""
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out)):
        raise BitNetError(f"merge output {out!r} exists and is not empty: choose another")
    ckpt = ckpt_io.resolve_checkpoint(path)
    stored = (ckpt_io.read_metadata(ckpt).get("run_config") or {}).get("peft") or {}
    if stored.get("method", "none") == "none":
        raise BitNetError(f"{ckpt!r} is not a PEFT run: there is nothing to merge")
    # QLoRA bases merge unpacked: a ternary one into its BitLinear layers, an NF4 one into
    # the full-precision weights NF4 gave back (what the adapters were trained against).
    unpacked = ["peft.method=lora"] if stored.get("method") in ("qlora", "qlora_ternary") else []

    def build():
        loaded = load_run(ckpt, unpacked)
        if stored.get("method") == "qlora":
            nf4_round_trip(loaded[1], stored.get("double_quant", True))
        return loaded

    cfg, model, tokenizer, ckpt = build()
    val = build_eval_dataset(cfg.data, tokenizer)
    if val is None:
        raise BitNetError("the run has no validation text to measure the merge on")
    bs = cfg.training.batch_size
    batches = [
        default_collate([val[j] for j in range(i, min(i + bs, len(val)))])
        for i in range(0, min(len(val), max_batches * bs), bs)
    ]
    merged, report = merge_lora(model, lambda: build()[1], batches, method)
    state = ckpt_io.read_state(ckpt)
    cfg.peft = PEFTConfig()  # the merged run is a plain (quantized) model
    meta = ckpt_io.read_metadata(ckpt)
    meta.update(run_config=cfg.to_dict(), merged_from=ckpt, merge=report.measured)
    with atomic_directory(out) as tmp:  # all or nothing (`out` is absent or empty)
        base = os.path.join(os.path.dirname(ckpt), "base")
        if os.path.isdir(base):
            shutil.copytree(base, os.path.join(tmp, "base"))
        keep = {k: state[k] for k in ("step", "tokens_seen", "steps_per_epoch") if k in state}
        keep.update(data={}, rng={}, callbacks=state.get("callbacks", {}))
        written = ckpt_io.save_checkpoint(tmp, int(state["step"]), merged, None, keep, {}, meta)
        ckpt_io.write_pointer(tmp, "latest", os.path.basename(written))
    return report


def load_run(path: str, overrides: list[str] = ()) -> tuple[RunConfig, nn.Module, object, str]:
    """The run config (with `overrides` applied), trained model, tokenizer and checkpoint
    directory of a run or checkpoint `path`, for evaluation and generation."""
    ckpt = ckpt_io.resolve_checkpoint(path)
    ckpt_io.read_state(ckpt)  # checks the format version
    data = ckpt_io.read_metadata(ckpt).get("run_config")
    if not isinstance(data, dict):
        raise BitNetError(f"checkpoint {ckpt!r} has no run config (not written by bitnet-train)")
    data = migrate_stored(data)
    for item in overrides:
        apply_override(data, item)
    cfg = config_from_dict(data)
    built = build_model(cfg, run_dir=os.path.dirname(os.path.abspath(ckpt)), init=False)
    CheckpointIO(trainable_only=cfg.peft.method != "none").load_model(built.model, ckpt)
    restore_quantization(built.model, cfg, ckpt_io.read_state(ckpt))
    check_tokenizer(ckpt, built.tokenizer)
    return cfg, built.model, built.tokenizer, ckpt


def whole_pipelined_model(run: Run) -> nn.Module | None:
    """The whole model of a pipeline-parallel run on rank 0 (None elsewhere): every stage
    sends its tensors to rank 0, which builds the model as the run did (without the layout)
    and puts the quantized layers where training left them. A collective: every rank calls
    it. For the end-of-run sample; a stage alone cannot generate."""
    dist, stage = torch.distributed, unwrap(run.model)
    mine = {k: v.detach().cpu() for k, v in stage.state_dict().items()}
    parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, parts, dst=0)
    if parts is None:
        return None
    whole = build_model(run.config, run_dir=run.config.training.output_dir, init=False).model
    whole.load_state_dict({k: v for part in parts for k, v in part.items()})
    restore_quantization(whole, run.config, run.trainer.state_dict())
    return whole


def restore_quantization(model: nn.Module, cfg: RunConfig, state: dict) -> None:
    """Put the quantized layers where training left them: the stage's QAT settings and the
    lambda, bit width and noise of the last trained step (the schedules are functions of the
    step, minus the steps a quantization tuner held them), so a checkpoint is evaluated and
    sampled as it was trained, not at the schedules' end."""
    layers = [m for m in model.modules() if isinstance(m, BitLinear)]
    if not layers:
        return
    callbacks = state.get("callbacks", {})
    stage = (callbacks.get("MultiStage") or {}).get("stage")
    if stage is not None and cfg.stages and 0 <= stage < len(cfg.stages):
        stage_cfg = cfg.qat.replace(**cfg.stages[stage].qat)
        for m in layers:
            m.config = stage_cfg
    held = int((callbacks.get("QATControl") or {}).get("held_steps", 0))
    step = max(0, int(state["step"]) - 1 - held)
    for m in layers:
        m.set_progress(step, state.get("steps_per_epoch", 1))


def score_generations(model: nn.Module, tokenizer, path: str, max_new_tokens: int) -> dict:
    """BLEU and chrF (sacrebleu) of `model`'s greedy continuations of the prompts of JSON
    lines file `path` against their references, streaming (one pair in memory at a time).
    A continuation ends at the end-of-text token or `max_new_tokens`; surrounding whitespace
    is stripped. Returns {"bleu", "chrf", "pairs"}."""
    if max_new_tokens < 1:
        raise BitNetError(f"--max-new-tokens={max_new_tokens} is invalid: expected >= 1")
    scores = GenerationScores()
    for prompt, reference in read_pairs(path):
        text = generate_text(model, tokenizer, prompt, max_new_tokens, 0.0, None, 0, True)
        scores.update(text.strip(), reference.strip())
    return {**scores.compute(), "pairs": scores.count}


def generate_text(
    model: nn.Module,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
    continuation_only: bool = False,
) -> str:
    """`prompt` continued by `model` (sampling when temperature > 0, else greedy), with
    `BitNetLM.generate` or a `transformers` model's own `generate`; `continuation_only`:
    only the new text, up to the end-of-text token."""
    # Training text is documents joined by EOS, so a document starts right after an EOS:
    # prefixing one makes the prompt look like the start of a document.
    ids = torch.tensor([[tokenizer.eos_token_id, *tokenizer.encode(prompt)]])
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int):
        max_new_tokens = max(0, min(max_new_tokens, limit - ids.shape[1]))
    sampling = dict(do_sample=temperature > 0, temperature=temperature or 1.0, top_k=top_k)
    model.eval()
    # A LoRA-wrapped BitNetLM generates through the BitNetLM inside (its layers carry the
    # adapters); the prompt wrappers take BitNetLM.generate's arguments themselves.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    ours = isinstance(inner, BitNetLM) or hasattr(model, "adapter_state_dict")
    with torch.no_grad():
        if ours:
            out = (model if hasattr(model, "adapter_state_dict") else inner).generate(
                ids,
                max_new_tokens=max_new_tokens,
                eos_token_id=tokenizer.eos_token_id,
                generator=torch.Generator().manual_seed(seed),
                vocab_limit=tokenizer.vocab_size,
                **sampling,
            )
        else:  # a transformers model: its generate draws from the global generator
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.eos_token_id,
                    **sampling,
                )
    if continuation_only:
        new = out[0, ids.shape[1] :].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        return tokenizer.decode(new)
    return tokenizer.decode(out[0])


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


def check_seq_len(model: nn.Module, seq_len: int) -> None:
    """Refuse windows longer than the model's positions (`max_position_embeddings`)."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and seq_len > limit:
        raise BitNetError(
            f"data.seq_len={seq_len} is invalid: expected at most the model's "
            f"max_position_embeddings ({limit})"
        )


def _same_tokenizer(shards_tokenizer, model_tokenizer, shards_dir: str) -> None:
    a, b = tokenizer_id(shards_tokenizer), tokenizer_id(model_tokenizer)
    if a != b:
        raise BitNetError(
            f"the shards in {shards_dir!r} were made with tokenizer {a}, the model's is {b}: "
            "preprocess with --tokenizer set to the model's tokenizer.json"
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
    old_src = (old.get("model") or {}).get("pretrained", "")
    if old_src != cfg.model.pretrained:
        raise BitNetError(
            f"checkpoint {ckpt!r} was trained from model.pretrained={old_src!r}; this run "
            f"has {cfg.model.pretrained!r}: resume with the same base"
        )
    if old.get("quantize") != cfg.quantize:
        raise BitNetError(
            f"checkpoint {ckpt!r} was trained with quantize={str(old.get('quantize')).lower()}; "
            f"this run has quantize={str(cfg.quantize).lower()}"
        )
    if old.get("qat") != cfg.to_dict()["qat"] and cfg.quantize:
        log.warning("resuming with QAT settings that differ from the checkpoint's")
    ours = cfg.to_dict()
    for section in ("peft", "loss", "teacher"):
        theirs = _flat(old.get(section) or {})
        changed = {k: v for k, v in _flat(ours[section]).items() if k in theirs and theirs[k] != v}
        for key, value in changed.items():
            if section == "peft":  # the adapters' shape and scaling: they were trained so
                raise BitNetError(
                    f"checkpoint {ckpt!r} was trained with peft.{key}={theirs[key]!r}; this run "
                    f"has {value!r}: resume with the run's peft settings"
                )
            log.warning(
                "resuming with %s.%s=%r (the checkpoint's was %r): it applies from the saved "
                "step on",
                section,
                key,
                value,
                theirs[key],
            )


def _flat(d: dict, prefix: str = "") -> dict:
    """A nested config mapping as {dotted key: value}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_output_dir(out: str, resume: str | None, overwrite: bool) -> None:
    """Refuse to mix runs in one directory: an output directory that holds checkpoints or
    logs needs `resume` (continue) or `overwrite` (`clear_output_dir` deletes them once the
    new run has passed every check)."""
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


def clear_output_dir(out: str) -> None:
    """Delete a previous run's checkpoints, pointers, logs, base copy and adapter in `out`."""
    for path in list_checkpoints(out) + glob.glob(os.path.join(out, ".tmp-checkpoint-*")):
        shutil.rmtree(path)
    for name in ("latest", "best", "metrics.jsonl", JOB_FILE):
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    for name in ("tensorboard", "base", "adapter"):
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)


def _absolute_paths(cfg: RunConfig) -> None:
    """Data and model paths as absolute paths, so a run's stored config works from anywhere."""
    d = cfg.data
    d.train_files = [os.path.abspath(f) for f in d.train_files]
    d.val_files = [os.path.abspath(f) for f in d.val_files]
    if d.shards_dir:
        d.shards_dir = os.path.abspath(d.shards_dir)
    if cfg.init_from:
        cfg.init_from = os.path.abspath(cfg.init_from)
    if cfg.model.pretrained:
        cfg.model.pretrained = os.path.abspath(cfg.model.pretrained)


def _init_from(model: nn.Module, path: str, tokenizer) -> str:
    """Load another run's weights into `model` (after its transforms): how a trained
    full-precision run is converted. Quantizer state (observer ranges, LSQ scales) starts
    afresh: a full-precision checkpoint has none."""
    init = ckpt_io.resolve_checkpoint(path)
    check_tokenizer(init, tokenizer)
    CheckpointIO().load_model(
        model, init, may_miss=lambda k: "act_observer." in k or "act_scale" in k
    )
    return f"init: weights from {init}"


def _describe(cfg: RunConfig, data: Datasets, seconds: float) -> str:
    if cfg.data.source == "stream":
        return f"data: streaming {data.info['train_files']} files (read lazily)"
    if cfg.data.source == "pairs":
        return (
            f"data: pairs, {data.info['train_pairs']} training and {data.info['val_pairs']} "
            f"validation pairs (fingerprint {data.info['fingerprint']}, {seconds:.1f} s)"
        )
    return (
        f"data: {data.info['source']}, {data.info['train_tokens']} training and "
        f"{data.info['val_tokens']} validation tokens (fingerprint "
        f"{data.info['fingerprint']}, {seconds:.1f} s)"
    )
