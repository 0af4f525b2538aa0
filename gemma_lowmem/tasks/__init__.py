"""Tasks: data + prompt template + target rendering + metric, each a small module plugged into the same loop.

An SFT task module provides ``build_datasets(cfg: DataConfig, seed: int) -> (train, val)`` lists of
:class:`~gemma_lowmem.data.conversation.Conversation`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from gemma_lowmem.errors import UserError

TASKS = {
    "summary_eval": "gemma_lowmem.tasks.summary_eval",
}


def get_task(name: str) -> ModuleType:
    """The task module registered under ``name``."""
    if name not in TASKS:
        raise UserError(f"unknown task '{name}'; available: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])
