"""Capture and restore every random generator a run draws from (torch CPU and CUDA, NumPy,
Python), in forms a checkpoint stores without pickles: tensors for safetensors, lists for JSON."""

from __future__ import annotations

import random

import numpy as np
import torch


def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, jsonable): torch generator states as uint8 tensors; NumPy's and Python's
    global states as nested lists."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = state
    np_state, py_state = np.random.get_state(), random.getstate()
    jsonable = {
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return tensors, jsonable


def restore_rng(tensors: dict[str, torch.Tensor], jsonable: dict) -> None:
    """Undo `capture_rng`: set every generator found in `tensors` / `jsonable`."""
    if "torch" in tensors:
        torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    if "numpy" in jsonable:
        kind, keys, pos, has_gauss, gauss = jsonable["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if "python" in jsonable:
        version, internal, gauss = jsonable["python"]
        random.setstate((version, tuple(internal), gauss))
