"""A whole training run from a ``RunConfig``: setup (data, model, tokens) -> ``fit`` -> summary.

Everything that can fail on user input (data, model name, budget, output folder) is checked before anything is
written, so a bad flag leaves no half-written run folder behind.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemma_lowmem.checkpoint import find_checkpoint
from gemma_lowmem.config import RunConfig
from gemma_lowmem.data.collate import collate_for
from gemma_lowmem.data.conversation import Conversation
from gemma_lowmem.data.tokenize import EncodedSet, encode_conversations
from gemma_lowmem.device import default_device, resolve_precision
from gemma_lowmem.distributed import current_ranks, init_distributed
from gemma_lowmem.errors import UserError
from gemma_lowmem.evaluation.answers import answer_and_score, compare_systems
from gemma_lowmem.evaluation.guided import Decoding
from gemma_lowmem.evaluation.report import write_report
from gemma_lowmem.memory import GLIBC_RETAINED_FACTOR, enforce_cap, parse_size, return_freed_memory_to_os
from gemma_lowmem.model import (
    CACHE,
    add_lora,
    count_parameters,
    load_base_model,
    load_tokenizer,
    resolve_model_path,
)
from gemma_lowmem.planner import apply_plan, load_model_config, plan_run
from gemma_lowmem.tasks import TaskTraining, get_task
from gemma_lowmem.train import FitResult, fit


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def choose_run_dir(cfg: RunConfig) -> Path:
    """The run folder: ``--output-dir``, the folder of ``--resume``, or ``runs/<timestamp>``; checked writable."""
    if cfg.train.output_dir:
        run_dir = Path(cfg.train.output_dir)
    elif cfg.train.resume:
        resume = Path(cfg.train.resume)
        run_dir = resume.parent.parent if resume.parent.name == "checkpoints" else resume
    else:
        run_dir = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    return writable_dir(run_dir)


def writable_dir(folder: Path) -> Path:
    """``folder``, checked before anything is written: not a file, and its nearest existing parent writable.

    Raises:
        UserError: naming ``--output-dir`` (the flag that picks the folder) and what is wrong.
    """
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output-dir {folder}: exists and is not a folder")
    parent = next(p for p in [folder, *folder.parents] if p.exists())
    if not os.access(parent, os.W_OK):
        raise UserError(f"--output-dir {folder}: {parent} is not writable")
    return folder


def plan_budget(model_config: Any, cfg: RunConfig, device: torch.device, keep: Collection[str],
                activation_factor: float = 1.0) -> RunConfig:
    """Fit the run into ``--max-mem``: the config with the planner's micro-batch, accumulation, checkpointing and
    loss chunk (settings in ``keep`` stay as given) and, on a GPU, the per-layer table's place; prints the plan
    (:func:`~gemma_lowmem.planner.plan_run` and :func:`~gemma_lowmem.planner.apply_plan`, as
    ``scripts/plan_memory.py`` does). Stops before loading if the load cannot fit.
    ``model_config``: the model's (:func:`~gemma_lowmem.planner.load_model_config`); ``activation_factor``: the
    task's (:class:`~gemma_lowmem.tasks.Task`)."""
    plan = plan_run(cfg, model_config, device, keep, activation_factor)
    planned = apply_plan(cfg, plan, device.type)
    if device.type == "cpu" and plan.predicted_peak * GLIBC_RETAINED_FACTOR > plan.budget:
        return_freed_memory_to_os()  # the budget is tight: give freed blocks back at once (slower, see memory.py)
    return planned


@dataclass
class Prepared:
    """What ``setup`` returns: everything ``fit`` needs."""

    model: torch.nn.Module
    tokenizer: Any
    training: TaskTraining
    run_dir: Path
    config: RunConfig  # the config to train with: the planner's choices applied
    train_conversations: list[Conversation] = field(default_factory=list)  # SFT tasks: kept after tokenizing
    val_conversations: list[Conversation] = field(default_factory=list)


def encode(cfg: RunConfig, tokenizer: Any, conversations: list[Conversation], desc: str) -> EncodedSet:
    cache = Path(cfg.data.cache_dir) if cfg.data.cache_dir else CACHE / "tokens"
    encoded = encode_conversations(
        tokenizer, conversations, cfg.data.max_seq_length, system_role=cfg.model.system_role, cache_dir=cache,
        desc=desc,
    )
    if encoded.n_cut or encoded.n_dropped:
        print(f"{desc}: {encoded.n_cut} conversations had their article cut to fit {cfg.data.max_seq_length} tokens, "
              f"{encoded.n_dropped} dropped (too long even after cutting)")
    return encoded


def setup(cfg: RunConfig, keep: Collection[str] = ()) -> Prepared:
    """Plan the memory, load data and model, add LoRA, tokenize; validates user input before anything is written.

    Args:
        cfg: the run's config.
        keep: settings the memory planner must not change (``planner.PLANNED`` names; ``scripts/train.py`` passes
            the ones given on the command line, a preset or a config file).
    """
    ranks = init_distributed()  # under torchrun: join the process group (NCCL on GPUs, gloo on the CPU)
    seed_everything(cfg.train.seed)
    device = default_device()
    with ranks.main_first():  # rank 0 converts a .gguf or the bundled model once; the others find it converted
        model_path = resolve_model_path(cfg.model.model)
    run_dir = Path(ranks.broadcast(str(choose_run_dir(cfg))))  # one folder for all ranks (the default has the time)
    if cfg.train.resume:
        find_checkpoint(cfg.train.resume)  # fail now, not after the model has loaded
    task = get_task(cfg.data.task)
    model_config = load_model_config(model_path)  # an offline hub id fails here
    # The SFT data next, before the plan is printed and the (slow) model load: a bad file fails alone and at once
    # (the planner changes no data setting).
    sft = task.prepare_training is None
    train_convs, val_convs = task.build_datasets(cfg.data, cfg.train.seed) if sft else ([], [])
    cfg = plan_budget(model_config, cfg, device, keep, task.activation_factor)
    print(f"model {cfg.model.model} -> {model_path}")
    tokenizer = load_tokenizer(model_path)
    base = load_base_model(cfg.model, device, cfg.train.precision)
    # Capped after loading: the load has its own peak, checked by the plan; the cap then holds training to budget.
    enforce_cap(parse_size(cfg.train.max_mem), device)
    torch.manual_seed(cfg.train.seed)  # LoRA init from the seed, whatever loading consumed
    model = add_lora(base, cfg.lora, cfg.train.gradient_checkpointing)
    trainable, total = count_parameters(model)
    print(f"LoRA: {trainable:,} trainable parameters ({100 * trainable / max(total, 1):.2f}% of {total:,} stored)")
    with ranks.main_first():  # rank 0 fills the token and reference log-prob caches; the others read them
        if sft:
            train = encode(cfg, tokenizer, train_convs, "tokenizing train")
            val = encode(cfg, tokenizer, val_convs, "tokenizing val")
        else:
            training = task.prepare_training(cfg, tokenizer, model)
    if not sft:
        return Prepared(model, tokenizer, training, run_dir, cfg)
    collate_fn = collate_for(model, pad_id=tokenizer.pad_token_id, packed=cfg.train.packing)
    return Prepared(model, tokenizer, TaskTraining(train.examples, val.examples, collate_fn), run_dir, cfg,
                    [train_convs[i] for i in train.kept], [val_convs[i] for i in val.kept])


def train_from_config(cfg: RunConfig, keep: Collection[str] = ()) -> tuple[Prepared, FitResult]:
    """Setup, then the loop; writes ``config.json`` (the planned config) and everything ``fit`` writes into the run
    folder. ``keep``: as in :func:`setup`."""
    prepared = setup(cfg, keep)
    cfg = prepared.config
    main = current_ranks().is_main  # under torchrun rank 0 alone writes
    if main:
        prepared.run_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(prepared.run_dir / "config.json")
    # Packed rows are as long as the longest allowed conversation unless set otherwise.
    train_cfg = replace(cfg.train, pack_len=cfg.train.pack_len or cfg.data.max_seq_length)
    training = prepared.training
    result = fit(
        prepared.model, training.train, training.val, train_cfg, run_dir=prepared.run_dir,
        collate_fn=training.collate_fn, run_config=cfg.to_dict(), loss_fn=training.loss_fn,
    )
    if cfg.train.push_to_hub and main and result.stopped != "signal":
        push_adapter(prepared.model, cfg.train.push_to_hub)
    return prepared, result


def report_after_training(cfg: RunConfig, prepared: Prepared) -> Path | None:
    """Answer the validation conversations with the base model (adapter off) and the trained adapter, score them
    with the task's metrics and write ``eval/report.md``; None when the task has no generation metrics or there
    is no validation data. A rubric task answers in ``eval.mode`` (guided by default: every answer valid, each
    score with its expected value), under training's autocast, with the int8 layers' float copies kept within
    ``--max-mem`` while decoding."""
    task = get_task(cfg.data.task)
    if task.score_outputs is None or not prepared.val_conversations:
        return None
    autocast = resolve_precision(next(prepared.model.parameters()).device, cfg.train.precision).autocast

    def answer(model: torch.nn.Module) -> dict[str, Any]:
        return answer_and_score(model, prepared.tokenizer, prepared.val_conversations, task.score_outputs,
                                Decoding.from_config(cfg, autocast), rubric=task.rubric,
                                examples=cfg.eval.report_examples)

    systems = compare_systems(prepared.model, True, answer)
    report = {"settings": {"task": cfg.data.task, "model": cfg.model.model, "eval": asdict(cfg.eval)},
              "systems": systems}
    _, md_path = write_report(report, prepared.run_dir / "eval", f"Evaluation after training: {cfg.data.task}")
    return md_path


def push_adapter(model: torch.nn.Module, repo: str) -> None:
    """Upload the adapter to the hub (needs network and a token from ``huggingface-cli login`` or ``HF_TOKEN``)."""
    try:
        model.push_to_hub(repo)
    except Exception as err:  # network, auth and permission errors come in many types
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"--push-to-hub {repo}: upload failed ({reason}); the adapter stays in the run dir") from None
    print(f"adapter pushed to https://huggingface.co/{repo}")
