"""Atomic checkpoints: the adapter in PEFT format plus everything needed to resume exactly.

A checkpoint is written into a temporary folder, fsynced, then renamed into place, so a run killed at any moment
(also during a save) leaves the previous complete checkpoint loadable.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors.torch import load_file

from gemma_lowmem.errors import UserError

STATE_FILE = "trainer_state.pt"
ADAPTER_FILE = "adapter_model.safetensors"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomically(folder: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` into a temporary sibling folder, fsync it, then rename it to ``folder``."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
        if folder.exists():  # re-saving the same step: the old copy goes only once the new one is complete
            old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
            folder.rename(old)
            tmp.rename(folder)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
        _fsync_tree(folder.parent)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write {folder}: {err.strerror or err}") from None


def _write_adapter(model: torch.nn.Module, folder: Path, config: dict[str, Any]) -> None:
    model.save_pretrained(folder)
    (folder / "run_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def save_adapter(model: torch.nn.Module, folder: Path, config: dict[str, Any]) -> None:
    """Write the adapter (PEFT format, loadable with ``PeftModel.from_pretrained``) and the run config atomically."""
    _write_atomically(folder, lambda tmp: _write_adapter(model, tmp, config))


def save_checkpoint(
    folder: Path, model: torch.nn.Module, trainer_state: dict[str, Any], config: dict[str, Any], keep: int
) -> Path:
    """Save a resumable checkpoint (adapter + optimizer, scheduler, scaler, data position, RNG) and prune old ones.

    Args:
        folder: the checkpoint folder, ``<run>/checkpoints/step-000123``.
        model: the PEFT model (only the adapter is written).
        trainer_state: optimizer/scheduler/scaler state dicts and the loop's counters.
        config: the resolved run config.
        keep: how many ``step-*`` checkpoints to keep.

    Returns:
        The folder written.
    """

    def write(tmp: Path) -> None:
        _write_adapter(model, tmp, config)
        torch.save({**trainer_state, "rng": rng_state()}, tmp / STATE_FILE)

    _write_atomically(folder, write)
    steps = sorted(p for p in folder.parent.glob("step-*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest complete checkpoint)."""
    path = Path(path)
    if (path / STATE_FILE).is_file():
        return path
    candidates = sorted((path / "checkpoints").glob("step-*")) if path.is_dir() else []
    candidates = [c for c in candidates if (c / STATE_FILE).is_file()]
    if not candidates:
        raise UserError(f"--resume {path}: not a checkpoint (no {STATE_FILE}) and no checkpoints/step-* inside")
    return candidates[-1]


def load_checkpoint(folder: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load the adapter weights into ``model`` and return the trainer state (RNG restored by the caller)."""
    try:
        set_peft_model_state_dict(model, load_file(folder / ADAPTER_FILE))
        return torch.load(folder / STATE_FILE, weights_only=False)
    except (OSError, RuntimeError, KeyError) as err:
        raise UserError(f"--resume {folder}: checkpoint is unreadable ({err})") from None
