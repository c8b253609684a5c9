"""Checkpoints: one directory per save, written atomically, loadable without running code.

Layout of `<output_dir>/checkpoint-<step>/`:
    model.safetensors      model weights (safetensors: tensors only, no code)
    optimizer.pt           optimizer state, `torch.save`d; read back with `weights_only=True`
    rng.safetensors        torch CPU (and CUDA) generator states, and callbacks' tensors
    trainer_state.json     format version, step, data position, callback and scheduler
                           states, grad-scaler state, Python and NumPy RNG states, config
    metadata.json          what the caller passed (the CLI stores the resolved run config)
`<output_dir>/latest` and `<output_dir>/best` are one-line files naming a checkpoint directory.

A save goes to a hidden temporary directory that is renamed into place only when every file
is written and synced, and the `latest` pointer moves after that: an error or a kill mid-save
leaves the previous checkpoint and pointer as they were.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from ..errors import BitNetError

FORMAT_VERSION = 1
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MODEL_FILE, OPTIMIZER_FILE, RNG_FILE = "model.safetensors", "optimizer.pt", "rng.safetensors"
STATE_FILE, METADATA_FILE = "trainer_state.json", "metadata.json"
REQUIRED_STATE = ("step", "tokens_seen", "data", "callbacks", "rng")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not every platform can open a directory; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def write_pointer(output_dir: str, name: str, target: str) -> None:
    """Atomically point `<output_dir>/<name>` (e.g. `latest`) at checkpoint dir `target`."""
    tmp = os.path.join(output_dir, f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write(target + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(output_dir, name))
    _fsync_dir(output_dir)


def read_pointer(output_dir: str, name: str) -> str | None:
    """The checkpoint directory `<output_dir>/<name>` points at, or None."""
    try:
        with open(os.path.join(output_dir, name)) as f:
            target = f.read().strip()
    except OSError:
        return None
    path = os.path.join(output_dir, target)
    return path if target and os.path.isdir(path) else None


def save_checkpoint(
    output_dir: str,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    state: dict,
    rng: dict[str, torch.Tensor],
    metadata: dict | None = None,
    _before_commit: Callable[[str], None] | None = None,
    trainable_only: bool = False,
) -> str:
    """Write checkpoint `step` under `output_dir` atomically and return its path.

    `state` must be JSON-serializable (the format version is added); `rng` maps names to
    uint8 generator-state tensors. An existing checkpoint of the same step is replaced only
    once the new one is complete. `_before_commit(tmp_dir)` is a test hook called just before
    the rename. `trainable_only` stores only the trainable parameters and the buffers.
    """
    os.makedirs(output_dir, exist_ok=True)

    def write(tmp: str) -> None:
        if trainable_only:
            save_file(trainable_state(model), os.path.join(tmp, MODEL_FILE))
        else:
            save_model(model, os.path.join(tmp, MODEL_FILE))
        if optimizer is not None:
            torch.save(optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_FILE))
        write_trainer_files(tmp, state, rng, metadata)

    return commit_checkpoint(output_dir, step, write, new_temp_dir(output_dir), _before_commit)


def new_temp_dir(output_dir: str) -> str:
    """A fresh hidden directory under `output_dir` to write a checkpoint into."""
    tmp = tempfile.mkdtemp(prefix=".tmp-checkpoint-", dir=output_dir)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint is an ordinary directory
    return tmp


def write_trainer_files(tmp: str, state: dict, rng: dict, metadata: dict | None) -> None:
    """The files every checkpoint format shares: RNG tensors, trainer state, metadata."""
    save_file({k: v.contiguous() for k, v in rng.items()}, os.path.join(tmp, RNG_FILE))
    _write_json(os.path.join(tmp, STATE_FILE), {**state, "format_version": FORMAT_VERSION})
    _write_json(os.path.join(tmp, METADATA_FILE), metadata or {})


def commit_checkpoint(
    output_dir: str,
    step: int,
    write: Callable[[str], None],
    tmp: str,
    before_commit: Callable[[str], None] | None = None,
) -> str:
    """`write(tmp)` the rest of checkpoint `step` into temporary directory `tmp`, sync every
    file, and rename `tmp` to `checkpoint-<step>` (replacing one of the same step only once
    the new one is complete); on any error `tmp` is removed. Returns the final path."""
    final = os.path.join(output_dir, checkpoint_name(step))
    try:
        write(tmp)
        for root, _, files in os.walk(tmp):  # torch.save and safetensors do not fsync
            for fname in files:
                with open(os.path.join(root, fname), "rb+") as f:
                    os.fsync(f.fileno())
            _fsync_dir(root)
        if before_commit is not None:
            before_commit(tmp)
        if os.path.exists(final):  # same step saved twice: swap, never leave neither
            trash = tempfile.mkdtemp(prefix=".trash-", dir=output_dir)
            os.replace(final, os.path.join(trash, "old"))
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoint directories under `output_dir`, oldest (lowest step) first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = CHECKPOINT_RE.match(name)
        if m and os.path.isfile(os.path.join(output_dir, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory from `path`: a checkpoint itself, or a run directory (its
    `latest` pointer, else its newest checkpoint). A `BitNetError` if there is none."""
    if not os.path.exists(path):
        raise BitNetError(f"checkpoint {path!r} does not exist")
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    if os.path.isdir(path):
        latest = read_pointer(path, "latest")
        if latest is not None:
            return latest
        found = list_checkpoints(path)
        if found:
            return found[-1]
    raise BitNetError(f"{path!r} is not a checkpoint and holds no checkpoints")


def read_state(ckpt: str) -> dict:
    """`trainer_state.json` of checkpoint `ckpt`, with its format version checked."""
    path = os.path.join(ckpt, STATE_FILE)
    try:
        with open(path) as f:
            state = json.load(f)
    except FileNotFoundError:
        raise BitNetError(f"{ckpt!r} is not a checkpoint (no {STATE_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BitNetError(f"checkpoint {ckpt!r} has an unreadable {STATE_FILE}: {e}") from None
    if not isinstance(state, dict):
        raise BitNetError(f"checkpoint {ckpt!r} has an unreadable {STATE_FILE}")
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise BitNetError(
            f"checkpoint {ckpt!r} has format version {version!r}; this bitnet-training "
            f"reads version {FORMAT_VERSION}"
        )
    missing = [k for k in REQUIRED_STATE if k not in state]
    if missing:
        raise BitNetError(f"checkpoint {ckpt!r} has an invalid {STATE_FILE}: no {missing[0]!r}")
    return state


def read_metadata(ckpt: str) -> dict:
    """`metadata.json` of checkpoint `ckpt` ({} when absent)."""
    try:
        with open(os.path.join(ckpt, METADATA_FILE)) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BitNetError(f"checkpoint {ckpt!r} has an unreadable {METADATA_FILE}: {e}") from None
    if not isinstance(meta, dict):
        raise BitNetError(f"checkpoint {ckpt!r} has an invalid {METADATA_FILE} (not a mapping)")
    return meta


def load_model_weights(
    model: torch.nn.Module, ckpt: str, may_miss=None, others: set[str] = frozenset()
) -> None:
    """Load `model.safetensors` of `ckpt` into `model`; a checkpoint of another architecture
    (missing, unexpected or differently shaped tensors) is a one-line `BitNetError`.
    `may_miss(name)` names tensors the checkpoint may lack (they keep their values);
    `others`, tensors it may hold beyond the model's (other pipeline stages')."""
    path = os.path.join(ckpt, MODEL_FILE)
    if not os.path.isfile(path):
        raise BitNetError(f"checkpoint {ckpt!r} has no {MODEL_FILE}")
    try:
        missing, unexpected = load_model(model, path, strict=False)
    except SafetensorError as e:
        raise BitNetError(f"checkpoint {ckpt!r}: unreadable {MODEL_FILE}: {e}") from None
    except RuntimeError as e:  # shape mismatch from load_state_dict
        first = str(e).strip().splitlines()[-1].strip()
        raise BitNetError(f"checkpoint {ckpt!r} does not fit this model: {first}") from None
    if may_miss is not None:
        missing = [k for k in missing if not may_miss(k)]
    refuse_mismatch(ckpt, missing, [k for k in unexpected if k not in others])


def refuse_mismatch(ckpt: str, missing, unexpected) -> None:
    """A one-line `BitNetError` naming the first tensor names `ckpt` lacks (`missing`) or has
    beyond the model's (`unexpected`), when there are any."""
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(sorted(missing)[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(sorted(unexpected)[:3])}")
        raise BitNetError(f"checkpoint {ckpt!r} does not fit this model: {'; '.join(parts)}")


def load_optimizer_state(ckpt: str) -> dict | None:
    """The optimizer state dict of `ckpt` (`weights_only=True`: data only), or None."""
    path = os.path.join(ckpt, OPTIMIZER_FILE)
    if not os.path.isfile(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle refused (not data-only) or a corrupt file
        raise BitNetError(f"checkpoint {ckpt!r}: cannot load {OPTIMIZER_FILE}: {e}") from None


def load_rng(ckpt: str) -> dict[str, torch.Tensor]:
    path = os.path.join(ckpt, RNG_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise BitNetError(f"checkpoint {ckpt!r}: unreadable {RNG_FILE}: {e}") from None


def prune_checkpoints(output_dir: str, keep: int | None, protect: set[str]) -> list[str]:
    """Delete the oldest checkpoints beyond the newest `keep`, never one in `protect`
    (the best and the latest). Returns the deleted paths."""
    if keep is None:
        return []
    found = list_checkpoints(output_dir)
    protect = {os.path.realpath(p) for p in protect if p}
    excess = len(found) - keep
    deleted = []
    for path in found:
        if excess <= 0:
            break
        if os.path.realpath(path) in protect:
            continue
        shutil.rmtree(path, ignore_errors=True)
        deleted.append(path)
        excess -= 1
    return deleted


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters and the persistent buffers of `model`, by state-dict name;
    not the buffers a module lists in `frozen_buffers` (a frozen base stored as buffers, such
    as a packed ternary weight: it is rebuilt from its source, never trained), nor the extra
    entries a module adds to its state dict (bitsandbytes' NF4 block scales of a frozen
    weight)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers(remove_duplicate=False)}
    frozen = {
        f"{name}.{b}" if name else b
        for name, m in model.named_modules()
        for b in getattr(m, "frozen_buffers", ())
    }
    return {
        k: v.detach().contiguous()
        for k, v in model.state_dict().items()
        if k in trainable or (k in buffers and k not in frozen)
    }


def load_trainable_weights(model: torch.nn.Module, ckpt: str) -> None:
    """Load a `trainable_only` checkpoint of `ckpt` into `model`: every trainable parameter
    must be in it, and nothing else than trainable parameters and buffers."""
    path = os.path.join(ckpt, MODEL_FILE)
    if not os.path.isfile(path):
        raise BitNetError(f"checkpoint {ckpt!r} has no {MODEL_FILE}")
    try:
        stored = load_file(path)
    except SafetensorError as e:
        raise BitNetError(f"checkpoint {ckpt!r}: unreadable {MODEL_FILE}: {e}") from None
    want = trainable_state(model)
    missing = sorted(k for k in want if k not in stored)
    unexpected = sorted(k for k in stored if k not in want)
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise BitNetError(f"checkpoint {ckpt!r} does not fit this model's adapters: {what}")
    try:
        model.load_state_dict(stored, strict=False)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()
        raise BitNetError(f"checkpoint {ckpt!r} does not fit this model: {first}") from None
