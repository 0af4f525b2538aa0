"""Tasks: each a :class:`Task` value (data + prompt + target rendering + metric) that plugs into the same loop.

A task is data and functions, not a subclass of anything: :func:`get_task` finds one by its ``--task`` name, and
:func:`register_task` adds one from any project (the built-in tasks are registered by module path and imported
on first use). The run asks a task for its conversations (``build_datasets``) and trains SFT on them, unless the
task has an objective of its own (``prepare_training``); evaluation asks it to score generated answers
(``score_outputs``) and decodes rubric answers guided by its ``rubric``; grading (``scripts/grade.py --task``)
asks a task with a rubric for the messages that grade a new row (``request``); the memory planner reads its
``activation_factor``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from gemma_lowmem.errors import UserError

if TYPE_CHECKING:
    from gemma_lowmem.config import DataConfig, RunConfig
    from gemma_lowmem.data.conversation import Conversation, Message
    from gemma_lowmem.evaluation.rubric import RubricSpec


@dataclass
class TaskTraining:
    """What ``fit`` trains on: examples, their collation and (for an objective other than SFT) the loss.

    Attributes:
        train: training examples; each has ``input_ids`` (its length plans batches and packing).
        val: validation examples (may be empty).
        collate_fn: ``collate_fn(rows) -> batch`` with ``num_loss_tokens`` and ``num_tokens``.
        loss_fn: ``loss_fn(model, batch) -> summed loss`` (divided by the window's ``num_loss_tokens``); None: the
            loop's SFT loss.
    """

    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    collate_fn: Callable[..., dict[str, Any]]
    loss_fn: Callable[..., Any] | None = None


@dataclass(frozen=True)
class Request:
    """How a rubric task asks its trained model to grade one new row (``grading``, ``scripts/grade.py --task``).

    Attributes:
        messages: ``(row, data config) -> messages`` up to the answer; ``row`` holds the fields below (an optional
            one may be missing or empty); the data config is the training run's (``lang``, ``max_article_length``).
        required: fields each row needs as non-empty text (e.g. the article).
        may_be_empty: fields each row needs as text, possibly empty (e.g. a student's blank summary).
        optional: fields read when a row has them (e.g. the reference).
    """

    messages: Callable[[Mapping[str, Any], DataConfig], list[Message]]
    required: tuple[str, ...]
    may_be_empty: tuple[str, ...] = ()
    optional: tuple[str, ...] = ()

    @property
    def fields(self) -> tuple[str, ...]:
        """``id``, then every input field in the order above: what ``--columns`` may map, the output's order."""
        return ("id", *self.required, *self.may_be_empty, *self.optional)


@dataclass(frozen=True)
class Task:
    """One task, as the run, the evaluation and the planner use it.

    Attributes:
        name: the ``--task`` name.
        build_datasets: ``(data config, seed) -> (train, validation)`` conversations; the run trains SFT on them
            and the evaluation answers the validation prompts.
        prepare_training: ``(run config, tokenizer, model) -> TaskTraining`` for an objective other than SFT
            (None: SFT on ``build_datasets``).
        score_outputs: ``(conversations, generated answers) -> {"metrics", "rows", "plots"}`` (None: the task has
            no generation metrics).
        rubric: the answers' rubric (None: free-form answers); evaluation decodes rubric answers guided.
        activation_factor: sequences through the policy per data row, for the memory planner (2.0 for preference
            pairs: chosen and rejected both keep activations).
        summary_statistics: ``(conversations) -> dict`` for ``scripts/prepare_data.py`` (None: counts only).
        request: how to ask the trained model to grade a new row (None: grading does not serve the task); a task
            with a ``rubric`` and a ``request`` is graded by ``scripts/grade.py --task``.
    """

    name: str
    build_datasets: Callable[[DataConfig, int], tuple[list[Conversation], list[Conversation]]]
    prepare_training: Callable[[RunConfig, Any, Any], TaskTraining] | None = None
    score_outputs: Callable[[list[Conversation], list[str]], dict[str, Any]] | None = None
    rubric: RubricSpec | None = None
    activation_factor: float = 1.0
    summary_statistics: Callable[[list[Conversation]], dict[str, Any]] | None = None
    request: Request | None = None

    def validation_conversations(self, data: DataConfig, seed: int) -> list[Conversation]:
        """The conversations to evaluate: the validation set of ``data``, at most ``data.max_val_samples``.

        With ``data.val_file`` only that file is read: it is the only source the task builds its data from (its
        "training" rows are the same file and are dropped), so evaluating never loads a training set, from the hub
        or anywhere else, that it does not need.

        Args:
            data: the data configuration.
            seed: the seed the conversations were built with in training.

        Returns:
            The validation conversations.
        """
        source = replace(data, train_file=data.val_file, data=None, demo=False) if data.val_file else data
        conversations = self.build_datasets(source, seed)[1]
        return conversations[: data.max_val_samples] if data.max_val_samples else conversations


# The built-in tasks: "module:attribute" of each Task value, imported on first use.
_BUILTIN = {
    "summary_eval": "gemma_lowmem.tasks.summary_eval:TASK",
    "topic": "gemma_lowmem.tasks.topic:TOPIC",
    "topic_grade": "gemma_lowmem.tasks.topic:TOPIC_GRADE",
    "essay": "gemma_lowmem.tasks.essay:TASK",
    "essay_write": "gemma_lowmem.tasks.essay_write:TASK",
    "preference": "gemma_lowmem.tasks.preference:DPO",
    "preference_sft": "gemma_lowmem.tasks.preference:SFT",
}
_REGISTERED: dict[str, Task] = {}


def register_task(task: Task) -> None:
    """Make ``task`` available as ``--task <task.name>`` (and to :func:`get_task`) in this process.

    Args:
        task: the task; a name already taken (built-in or registered) is an error.

    Raises:
        ValueError: the name is taken.
    """
    if task.name in _BUILTIN or task.name in _REGISTERED:
        raise ValueError(f"a task named {task.name!r} is already registered")
    _REGISTERED[task.name] = task


def task_names() -> list[str]:
    """Every task name :func:`get_task` knows, built-in first."""
    return [*_BUILTIN, *_REGISTERED]


def get_task(name: str) -> Task:
    """The task registered under ``name``.

    Raises:
        UserError: no task has that name (the message lists the names).
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN:
        raise UserError(f"unknown task '{name}'; available: {', '.join(task_names())}")
    module, attribute = _BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), attribute)
