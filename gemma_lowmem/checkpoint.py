"""Atomic checkpoints: the adapter in PEFT format plus everything needed to resume exactly.

Every save goes through :func:`_write_atomically`: the files are written into a hidden sibling folder
(``.tmp-<name>``), fsynced, and renamed into place. Replacing a folder that exists moves the old copy aside
(``.old-<name>``) and deletes it only once the new one is in place; pruning renames a checkpoint to
``.trash-<name>`` before deleting it. So a ``step-*`` folder is always complete, and a run killed at any moment
(also in the middle of a save) leaves every complete checkpoint loadable. The next save tidies what a kill left
behind (:func:`_tidy`), and :func:`find_checkpoint` also takes a moved-aside copy whose replacement never landed.

One process writes a run folder (rank 0 under data parallelism), so any hidden folder in it is a leftover.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import set_peft_model_state_dict
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from gemma_lowmem.data.records import json_error
from gemma_lowmem.errors import UserError
from gemma_lowmem.memory import format_size

STATE_FILE = "trainer_state.pt"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DAMAGED = "cut short or damaged (a copy or download that did not finish?)"
_TMP, _OLD, _TRASH = ".tmp-", ".old-", ".trash-"
# What a failed write raises: OSError from Python, RuntimeError from torch.save's C++ writer, SafetensorError.
_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The RNG states that dropout and data shuffling read: Python, NumPy, torch CPU and this process's GPU.

    Args:
        device: the training device; its CUDA generator is saved too (only this one: touching every GPU's
            generator would create a CUDA context on each from every data-parallel rank).

    Returns:
        A picklable dict for :func:`set_rng_state`.
    """
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore what :func:`rng_state` saved (the CUDA generator onto ``device``)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)  # a folder too: its fsync makes the names in it durable
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in [*folder.rglob("*"), folder]:
        _fsync(path)


def _delete(folder: Path) -> None:
    """Remove a folder by renaming it to a hidden name first, so no half-deleted folder keeps a real name."""
    trash = folder.with_name(_TRASH + folder.name)
    shutil.rmtree(trash, ignore_errors=True)
    folder.rename(trash)
    shutil.rmtree(trash)


def _tidy(parent: Path) -> None:
    """Clean up after a process killed while saving into ``parent``: drop half-written and half-deleted folders;
    put back a moved-aside folder whose replacement never landed, or drop it when the replacement did."""
    for path in parent.glob(".*-*"):
        if path.name.startswith((_TMP, _TRASH)):
            shutil.rmtree(path, ignore_errors=True)
        elif path.name.startswith(_OLD):
            original = path.with_name(path.name[len(_OLD) :])
            if original.exists():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.rename(original)


def _write_atomically(folder: Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp)`` into a temporary sibling folder, fsync it, then rename it to ``folder``.

    Raises:
        UserError: the disk is full or not writable; ``folder`` (or its previous copy) is left as it was.
    """
    parent = folder.parent
    old = folder.with_name(_OLD + folder.name)
    tmp = folder.with_name(_TMP + folder.name)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _tidy(parent)
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
        if folder.exists():  # replacing (adapter_best, a step saved again): the old copy goes once the new one is in
            folder.rename(old)
            tmp.rename(folder)
            _fsync(parent)
            shutil.rmtree(old)
        else:
            tmp.rename(folder)
        _fsync(parent)
    except _WRITE_ERRORS as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not folder.exists():
            old.rename(folder)
        free = f" ({format_size(shutil.disk_usage(parent).free)} free on that disk)" if parent.exists() else ""
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
        raise UserError(
            f"could not write {folder}: {reason}{free}; earlier checkpoints are intact: free some space or choose "
            "another --output-dir, then --resume"
        ) from None


class _KeepWriteError(io.RawIOBase):
    """A file for ``torch.save`` that keeps the ``OSError`` of a failed write: torch's own writer turns it into
    "unexpected pos 576 vs 534", which says nothing of a full disk."""

    def __init__(self, file: io.BufferedWriter) -> None:
        self.file, self.error = file, None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise


def _torch_save(obj: Any, path: Path) -> None:
    with path.open("wb") as file:
        sink = _KeepWriteError(file)
        try:
            torch.save(obj, sink)
        except RuntimeError:
            if sink.error is not None:
                raise sink.error from None
            raise


def _write_adapter(model: torch.nn.Module, folder: Path, config: dict[str, Any]) -> None:
    model.save_pretrained(folder)
    (folder / "run_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def save_adapter(model: torch.nn.Module, folder: Path, config: dict[str, Any]) -> None:
    """Write the adapter (PEFT format, loadable with ``PeftModel.from_pretrained``) and the run config atomically.

    Args:
        model: the PEFT model (only the adapter is written).
        folder: where the adapter goes, e.g. ``<run>/adapter``.
        config: the resolved run config, saved next to it as ``run_config.json``.
    """
    _write_atomically(folder, lambda tmp: _write_adapter(model, tmp, config))


def check_adapter(folder: str | Path, config: bool = True,
                  fix: str = "copy the folder again from where it was trained, or give another one") -> None:
    """Check an adapter folder's files before a model loads (cheap: the JSON and the safetensors header only).

    A truncated ``adapter_model.safetensors`` fails here: its header must cover the whole file.

    Args:
        folder: a folder written by :func:`save_adapter` or :func:`save_checkpoint`.
        config: check ``adapter_config.json`` too (``--resume`` reads only the weights).
        fix: what the user can do about a damaged file, for the message.

    Raises:
        UserError: one line naming the file and what is wrong with it.
    """
    folder = Path(folder)
    if config:
        config_file = folder / ADAPTER_CONFIG
        if not config_file.is_file():
            raise UserError(f"{folder}: not an adapter folder (no {ADAPTER_CONFIG})")
        try:
            saved = json.loads(config_file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"{config_file}: not UTF-8 text, {DAMAGED}; {fix}") from None
        except json.JSONDecodeError as err:
            raise UserError(f"{config_file}: not valid JSON ({json_error(err)}), {DAMAGED}; {fix}") from None
        if not isinstance(saved, dict) or "peft_type" not in saved:
            raise UserError(f"{config_file}: not a PEFT adapter config (a JSON object with 'peft_type'); {fix}")
    weights = folder / ADAPTER_FILE
    if not weights.is_file():
        raise UserError(f"{weights}: no such file; an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_FILE}")
    try:
        with safe_open(weights, framework="pt"):
            pass
    except SafetensorError as err:
        raise UserError(f"{weights}: not a whole safetensors file ({err}), {DAMAGED}; {fix}") from None


def checkpoint_step(folder: Path) -> int:
    """The optimizer step of a checkpoint folder named ``step-000123`` (or a moved-aside ``.old-step-000123``)."""
    return int(folder.name.rsplit("-", 1)[1])


def save_checkpoint(
    folder: Path, model: torch.nn.Module, trainer_state: dict[str, Any], config: dict[str, Any], keep: int
) -> Path:
    """Save a resumable checkpoint (adapter + optimizer, scheduler, scaler, data position, RNG) and prune old ones.

    Checkpoints of later steps are deleted too: they belong to the run that an earlier checkpoint was resumed from,
    and ``--resume <run>`` must not pick them up.

    Args:
        folder: the checkpoint folder, ``<run>/checkpoints/step-000123``.
        model: the PEFT model (only the adapter is written).
        trainer_state: optimizer/scheduler/scaler state dicts, the loop's counters and RNG states.
        config: the resolved run config.
        keep: how many ``step-*`` checkpoints to keep.

    Returns:
        The folder written.
    """

    def write(tmp: Path) -> None:
        _write_adapter(model, tmp, config)
        _torch_save(trainer_state, tmp / STATE_FILE)

    _write_atomically(folder, write)
    step = checkpoint_step(folder)
    steps = sorted((p for p in folder.parent.glob("step-*") if p.is_dir()), key=checkpoint_step)
    earlier = [p for p in steps if checkpoint_step(p) <= step]
    for old in [p for p in steps if checkpoint_step(p) > step] + earlier[:-keep]:
        _delete(old)
    return folder


def _first_line(err: Exception) -> str:
    """An error's message, its first line only (a message is one line), or its type when it has none."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _complete_checkpoints(folder: Path) -> list[Path]:
    """The complete ``step-*`` checkpoints in ``<run>/checkpoints``, oldest first."""
    complete = [c for c in folder.glob("step-*") if (c / STATE_FILE).is_file()] if folder.is_dir() else []
    # A kill between the two renames of a re-save leaves the complete old copy under a hidden name.
    stranded = folder.glob(_OLD + "step-*") if folder.is_dir() else []
    complete += [c for c in stranded if (c / STATE_FILE).is_file() and not (folder / c.name[len(_OLD) :]).exists()]
    return sorted(complete, key=checkpoint_step)


def _other_checkpoint(folder: Path) -> str:
    """What to do about a damaged checkpoint: resume from the latest earlier one, if there is one."""
    try:
        step = checkpoint_step(folder)
    except (IndexError, ValueError):  # a checkpoint folder renamed by hand: no order to go by
        return "resume from another checkpoint, or start again without --resume"
    earlier = [c for c in _complete_checkpoints(folder.parent) if checkpoint_step(c) < step]
    return f"--resume {earlier[-1]} (the one before)" if earlier else "start again without --resume"


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, or a run folder (its latest complete checkpoint); reads only, writes nothing.

    Its adapter weights are checked (:func:`check_adapter`), so a damaged file fails before a model loads.

    Args:
        path: ``<run>/checkpoints/step-000123`` or ``<run>``.

    Returns:
        The checkpoint folder to load.

    Raises:
        UserError: no complete checkpoint there, or its adapter weights are damaged (naming the one before).
    """
    path = Path(path)
    if (path / STATE_FILE).is_file():
        found = path
    else:
        complete = _complete_checkpoints(path / "checkpoints")
        if not complete:
            raise UserError(f"--resume {path}: not a checkpoint (no {STATE_FILE}) and no checkpoints/step-* inside")
        found = complete[-1]
    check_adapter(found, config=False, fix=_other_checkpoint(found))
    return found


def load_checkpoint(folder: Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load the adapter weights into ``model`` and return the trainer state (RNG restored by the caller).

    Raises:
        UserError: a file is unreadable (naming it), or the adapter does not fit the model (another LoRA rank or
            target).
    """
    weights_file, state_file = folder / ADAPTER_FILE, folder / STATE_FILE
    try:
        weights = load_file(weights_file)
    except (OSError, SafetensorError) as err:
        raise UserError(f"--resume {weights_file}: unreadable, {DAMAGED} ({_first_line(err)}); "
                        f"{_other_checkpoint(folder)}") from None
    try:
        result = set_peft_model_state_dict(model, weights)
    except torch.OutOfMemoryError:
        raise  # a RuntimeError too, but about memory, not the checkpoint
    except (RuntimeError, KeyError) as err:  # a tensor of another shape: another LoRA rank or model
        raise UserError(f"--resume {folder}: the checkpoint's adapter does not fit this model "
                        f"({_first_line(err)}); use the same --model, --lora-r and --target-modules as the "
                        "run that saved it") from None
    try:
        # on the CPU first: a GPU-saved checkpoint resumes on a CPU, and torchrun ranks do not all land on cuda:0
        state = torch.load(state_file, weights_only=False, map_location="cpu")
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise UserError(f"--resume {state_file}: unreadable, {DAMAGED} ({_first_line(err)}); "
                        f"{_other_checkpoint(folder)}") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        example = (missing or result.unexpected_keys)[0]
        raise UserError(
            f"--resume {folder}: the checkpoint's adapter does not fit this model ({len(missing)} adapter weights "
            f"missing, {len(result.unexpected_keys)} unexpected, e.g. {example}); use the same --model, --lora-r "
            "and --target-modules as the run that saved it"
        )
    return state
