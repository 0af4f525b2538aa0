"""Tasks: data + prompt template + target rendering + metric, each a small module plugged into the same loop.

An SFT task module provides ``build_datasets(cfg: DataConfig, seed: int) -> (train, val)`` lists of
:class:`~gemma_lowmem.data.conversation.Conversation`; the run tokenizes them and trains with the SFT loss.
A task with another objective (preference pairs) also provides
``prepare_training(cfg: RunConfig, tokenizer, model) -> TaskTraining | None``: its own examples, loss and
collation (None: train SFT on ``build_datasets`` after all).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from gemma_lowmem.errors import UserError


@dataclass
class TaskTraining:
    """What a task with its own objective hands to ``fit``.

    Attributes:
        train: training examples; each has ``input_ids`` (its length plans batches and packing).
        val: validation examples (may be empty).
        loss_fn: ``loss_fn(model, batch) -> summed loss`` (divided by the window's ``num_loss_tokens``);
            None: the loop's SFT loss.
        collate_fn: ``collate_fn(rows) -> batch`` with ``num_loss_tokens`` and ``num_tokens``; None: the loop's.
    """

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    loss_fn: Callable[..., Any] | None = None
    collate_fn: Callable[..., dict[str, Any]] | None = None


TASKS = {
    "summary_eval": "gemma_lowmem.tasks.summary_eval",
    "topic": "gemma_lowmem.tasks.topic",
    "topic_grade": "gemma_lowmem.tasks.topic",
    "essay": "gemma_lowmem.tasks.essay",
    "essay_write": "gemma_lowmem.tasks.essay_write",
    "preference": "gemma_lowmem.tasks.preference",
    "preference_sft": "gemma_lowmem.tasks.preference",
}


def get_task(name: str) -> ModuleType:
    """The task module registered under ``name``."""
    if name not in TASKS:
        raise UserError(f"unknown task '{name}'; available: {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])
