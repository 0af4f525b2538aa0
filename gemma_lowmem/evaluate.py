"""Evaluation by generation: greedy answers to validation prompts, the task's scores, a report with plots.

:func:`evaluate_model` is the core (training runs call it at their end). :func:`run_evaluation` is what
``scripts/evaluate.py`` does: load the base model once, put the adapter on it, evaluate the base model (adapter
disabled: no second copy in memory) and/or the adapter, and write ``report.json`` and ``report.md``.
With human judgments (SummEval style) it instead grades rated summaries and reports how the evaluator's criteria
correlate with the human ratings, next to ROUGE's correlations on the same rows.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from peft import PeftModel

from gemma_lowmem.cli import config_from_args, given_settings
from gemma_lowmem.config import SECTIONS, RunConfig, read_config_file
from gemma_lowmem.data.conversation import Conversation, Message
from gemma_lowmem.data.tokenize import render
from gemma_lowmem.device import default_device, resolve_precision
from gemma_lowmem.errors import UserError
from gemma_lowmem.evaluation.generate import Autocast
from gemma_lowmem.evaluation.guided import RubricAnswer, rubric_answers
from gemma_lowmem.evaluation.human import HUMAN_DIMENSIONS, Judgment, correlation_matrix, read_judgments
from gemma_lowmem.evaluation.metrics import agreement
from gemma_lowmem.evaluation.report import write_report
from gemma_lowmem.evaluation.rouge import rouge_pair
from gemma_lowmem.evaluation.rubric import CRITERIA, SUMMARY_RUBRIC
from gemma_lowmem.memory import PeakMemory
from gemma_lowmem.model import (
    float_weight_cache,
    load_adapter,
    load_base_model,
    load_tokenizer,
    resolve_model_path,
)
from gemma_lowmem.tasks import get_task
from gemma_lowmem.tasks.summary_eval import evaluation_prompt
from gemma_lowmem.text import cut_at_sentence_end

EXAMPLES = 5  # examples shown in the report
PROMPT_HEAD, PROMPT_TAIL = 300, 900  # characters of a prompt shown in the report: its start and its end
# Each rubric criterion and the human dimension it measures; the total goes with the mean of the four ratings.
HUMAN_PAIRS = (("coverage", "relevance"), ("accuracy", "consistency"), ("grammar", "fluency"), ("total", "mean"))
ROUGE_KINDS = {"rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}
DATA_SOURCES = {"data", "train_file", "val_file", "demo"}  # data fields that pick where rows come from


@dataclass
class EvalOptions:
    """What the evaluation script adds to the run configuration."""

    adapter: str | None = None  # adapter folder (PEFT format, as training saves it)
    compare: bool = False  # evaluate the base model (adapter disabled) and the adapter in one run
    human_judgments: str | None = None  # SummEval-style JSONL of rated summaries
    show_progress: bool = True  # progress bar while generating

    def __post_init__(self) -> None:
        if self.compare and not self.adapter:
            raise UserError("--compare evaluates the base model against an adapter: give the adapter with --adapter")


# ------------------------------------------------------------------------------------------------------ generation


def prompt_excerpt(prompt: str, head: int = PROMPT_HEAD, tail: int = PROMPT_TAIL) -> str:
    """The start and the end of a long prompt (the end holds the question), the middle replaced by a marker."""
    if len(prompt) <= head + tail + 200:  # cutting less than that would not make it shorter to read
        return prompt
    return f"{prompt[:head]}\n[... {len(prompt) - head - tail:,} characters ...]\n{prompt[-tail:]}"


def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    message_lists: list[list[Message]],
    *,
    max_new_tokens: int,
    batch_size: int,
    system_role: bool,
    show_progress: bool = True,
    mode: str = "free",
    rubric: Any = None,
    lang: str = "ko",
    autocast: Autocast = contextlib.nullcontext,
    memory_budget: int | None = None,
) -> tuple[list[str], list[RubricAnswer], dict[str, Any]]:
    """Render each message list with a generation prompt and answer it (free greedy, or guided by a rubric).

    Args:
        model: the causal LM (a PEFT model generates with its active adapter).
        tokenizer: its tokenizer.
        message_lists: the turns before each answer.
        max_new_tokens: longest free answer in tokens.
        batch_size: prompts per generation batch.
        system_role: keep a system turn (else folded into the first user turn), as in training.
        show_progress: show a progress bar.
        mode: ``free``, ``guided`` or ``scores`` (:mod:`gemma_lowmem.evaluation.guided`); without ``rubric``
            always ``free``.
        rubric: the answers' :class:`~gemma_lowmem.evaluation.rubric.RubricSpec` (None: not a rubric task).
        lang: the answers' language.
        autocast: zero-argument callable returning the context manager of every forward (training's).
        memory_budget: the run's budget in bytes (``--max-mem``); the int8 layers' float copies kept while
            decoding (:func:`~gemma_lowmem.model.float_weight_cache`) fit in what is free within it.

    Returns:
        ``(prompts, answers, stats)``; stats: ``mode``, ``prompts``, ``seconds``, ``seconds_per_answer``,
        ``prompt_tokens_mean``/``_max``, ``answer_tokens`` (the answers re-tokenized: the stop token and special
        tokens are not counted), ``answer_tokens_per_s``, ``peak_memory_gib`` (CUDA allocated and reserved, or
        CPU peak RSS, of this phase), ``float_weights`` (GiB of float copies kept, layers left on the kernel).
    """
    mode = mode if rubric is not None else "free"
    prompts = [render(tokenizer, m, add_generation_prompt=True, system_role=system_role) for m in message_lists]
    device = next(model.parameters()).device
    peak = PeakMemory(device)
    peak.reset()
    start = time.perf_counter()
    with float_weight_cache(model, budget=memory_budget) as weights:
        answers = rubric_answers(model, tokenizer, prompts, **({"spec": rubric} if rubric is not None else {}),
                                 lang=lang, mode=mode, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 show_progress=show_progress, autocast=autocast)
        float_weights = {"gib": weights.used / 2**30, "layers_without": weights.skipped}
    seconds = time.perf_counter() - start  # exact: generation copies each batch's tokens to the host (a sync)
    prompt_tokens = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    answer_tokens = sum(len(tokenizer(a.text, add_special_tokens=False)["input_ids"]) for a in answers)
    stats = {
        "mode": mode, "prompts": len(prompts), "seconds": seconds,
        "seconds_per_answer": seconds / len(prompts) if prompts else None,
        "prompt_tokens_mean": statistics.fmean(prompt_tokens) if prompts else None,
        "prompt_tokens_max": max(prompt_tokens, default=None),
        "answer_tokens": answer_tokens, "answer_tokens_per_s": answer_tokens / seconds if seconds > 0 else None,
        "peak_memory_gib": {k: v / 2**30 for k, v in peak.read().items()},
        "float_weights": float_weights,  # the int8 layers' float copies while decoding
    }
    return prompts, answers, stats


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    conversations: list[Conversation],
    task_module: ModuleType,
    *,
    max_new_tokens: int,
    batch_size: int,
    system_role: bool,
    show_progress: bool = True,
    examples: int = EXAMPLES,
    mode: str = "guided",
    autocast: Autocast = contextlib.nullcontext,
    memory_budget: int | None = None,
) -> dict[str, Any]:
    """Answer each conversation's prompt (all turns but the last) and score the answers with the task.

    A rubric task (its module names its ``RUBRIC``) is answered in ``mode`` (guided by default: every answer is
    valid and each score comes with its expected value); any other task generates freely.

    Args:
        model: the causal LM; a PEFT model generates with its adapter (inside ``disable_adapter()``: without).
        tokenizer: its tokenizer.
        conversations: the evaluation conversations; the last turn of each is the target answer.
        task_module: the task; its ``score_outputs(conversations, outputs)`` gives metrics, rows and plot specs.
        max_new_tokens: longest answer in tokens.
        batch_size: prompts per generation batch.
        system_role: as the model was trained (Gemma: False, the system text goes into the first user turn).
        show_progress: show a progress bar.
        examples: how many examples (prompt excerpt, answer, target, scores) to keep for the report.
        mode: ``guided``, ``scores`` or ``free`` for a rubric task.
        autocast: zero-argument callable returning the context manager of every forward (training's).
        memory_budget: as in :func:`generate_answers`.

    Returns:
        One system's report part: ``n``; ``metrics`` (the task's, plus ``generation``: mode, time, tokens/s,
        peak memory; guided modes add ``expected_agreement``: the expected scores against the targets);
        ``plots``; ``examples``; ``rows`` (the task's per-example rows); ``outputs`` (every answer).
    """
    if not conversations:
        raise ValueError("no conversations to evaluate")
    rubric = getattr(task_module, "RUBRIC", None)
    prompts, answers, stats = generate_answers(
        model, tokenizer, [c.messages[:-1] for c in conversations], max_new_tokens=max_new_tokens,
        batch_size=batch_size, system_role=system_role, show_progress=show_progress, mode=mode, rubric=rubric,
        lang=conversations[0].meta.get("lang", "ko"), autocast=autocast, memory_budget=memory_budget,
    )
    outputs = [a.text for a in answers]
    scored = task_module.score_outputs(conversations, outputs)
    if rubric is not None and stats["mode"] != "free":
        scored["metrics"]["expected_agreement"] = expected_agreement(conversations, answers, rubric)
    kept = [
        {"index": i, "prompt_excerpt": prompt_excerpt(prompts[i]), "generated": outputs[i],
         "target_text": conversations[i].messages[-1]["content"], "row": scored["rows"][i]}
        for i in range(min(examples, len(conversations)))
    ]
    return {"n": len(conversations), "metrics": {**scored["metrics"], "generation": stats},
            "plots": scored["plots"], "examples": kept, "rows": scored["rows"], "outputs": outputs}


def expected_agreement(conversations: list[Conversation], answers: list[RubricAnswer], rubric: Any
                       ) -> dict[str, dict[str, Any]]:
    """Agreement of the expected scores (``sum p(s) * s``) with the targets, per criterion and for the total.

    Args:
        conversations: with the target scores in ``meta["scores"]``.
        answers: their guided answers.
        rubric: the rubric (criteria and maxima).

    Returns:
        ``total`` and each criterion -> :func:`~gemma_lowmem.evaluation.metrics.agreement`.
    """
    targets = [c.meta["scores"] for c in conversations]
    out = {"total": agreement([a.expected_total for a in answers], [float(t["total"]) for t in targets],
                              rubric.max_total)}
    for key, (maximum, _, _) in rubric.criteria.items():
        out[key] = agreement([a.readings[key].expected for a in answers], [float(t[key]) for t in targets], maximum)
    return out


def evaluate_systems(
    model: torch.nn.Module, compare: bool, evaluate: Callable[[torch.nn.Module], dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Evaluate the model, and with ``compare`` first the same model with its adapter disabled.

    Args:
        model: a base model, or a PEFT model (the adapter).
        compare: also evaluate the base model, through PEFT's ``disable_adapter()`` (no second model in memory).
        evaluate: ``evaluate(model) -> one system's report part``.

    Returns:
        ``{"base": ..., "adapter": ...}`` with ``compare``; else one entry, named after what ``model`` is.
    """
    is_adapter = isinstance(model, PeftModel)
    if compare and not is_adapter:
        raise UserError("--compare needs an adapter on the model: give it with --adapter")
    systems = {}
    if compare:
        with model.disable_adapter():
            systems["base"] = evaluate(model)
    systems["adapter" if is_adapter else "base"] = evaluate(model)
    return systems


# --------------------------------------------------------------------------------------------- human judgments


def _human_ratings(judgments: list[Judgment]) -> dict[str, list[float]]:
    ratings = {dim: [j.ratings[dim] for j in judgments] for dim in HUMAN_DIMENSIONS}
    return {**ratings, "mean": [j.mean_rating for j in judgments]}


def rouge_correlations(judgments: list[Judgment]) -> dict[str, dict[str, dict[str, Any]]]:
    """Summary-level correlations of ROUGE-1/2/L F1 (summary vs its first reference) with each human rating.

    Args:
        judgments: the rated summaries.

    Returns:
        ROUGE type -> human dimension (and ``mean``) -> ``spearman``, ``kendall``, ``documents``, ...
    """
    pairs = [rouge_pair(j.summary, j.reference) for j in judgments]
    scores = {kind: [p[kind].fmeasure for p in pairs] for kind in ROUGE_KINDS}
    return correlation_matrix([j.doc_id for j in judgments], scores, _human_ratings(judgments))


def evaluate_human_judgments(
    model: torch.nn.Module,
    tokenizer: Any,
    judgments: list[Judgment],
    *,
    lang: str,
    max_article_length: int,
    max_new_tokens: int,
    batch_size: int,
    system_role: bool,
    show_progress: bool = True,
    examples: int = EXAMPLES,
    mode: str = "guided",
    autocast: Autocast = contextlib.nullcontext,
    memory_budget: int | None = None,
) -> dict[str, Any]:
    """Grade each rated summary with the rubric evaluator and correlate its scores with the human ratings.

    An answer that does not parse as a valid rubric (see ``parse_rubric``) drops that summary from the
    correlations; ``valid_rate`` says how many remained.

    Args:
        model: the evaluator.
        tokenizer: its tokenizer.
        judgments: the rated summaries (see :func:`~gemma_lowmem.evaluation.human.read_judgments`).
        lang: prompt language, ``"ko"`` or ``"en"``.
        max_article_length: articles are cut to this many characters at a sentence end, as in training.
        max_new_tokens: longest answer in tokens.
        batch_size: prompts per generation batch.
        system_role: as the model was trained.
        show_progress: show a progress bar.
        examples: how many examples to keep for the report.
        mode: ``guided``, ``scores`` or ``free``.
        autocast: zero-argument callable returning the context manager of every forward.

    Returns:
        One system's report part: ``n``, ``metrics`` (``valid_rate``, ``documents``, ``pairs``: criterion ~ its
        human dimension -> ``spearman``, ``kendall``, ``documents``; ``generation``), ``correlations`` (every
        criterion and the total against every human dimension and the mean), ``plots``, ``examples``, ``rows``,
        ``outputs``.
    """
    messages = [evaluation_prompt(cut_at_sentence_end(j.article, max_article_length), j.summary, j.reference, lang)
                for j in judgments]
    prompts, answers, stats = generate_answers(model, tokenizer, messages, max_new_tokens=max_new_tokens,
                                               batch_size=batch_size, system_role=system_role,
                                               show_progress=show_progress, mode=mode, rubric=SUMMARY_RUBRIC,
                                               lang=lang, autocast=autocast)
    outputs = [a.text for a in answers]
    parsed = [a.result for a in answers]
    scores = {key: [p.scores[key] if p.valid else None for p in parsed] for key in CRITERIA}
    scores["total"] = [p.total if p.valid else None for p in parsed]
    humans = _human_ratings(judgments)
    matrix = correlation_matrix([j.doc_id for j in judgments], scores, humans)
    metrics = {
        "n": len(judgments), "documents": len({j.doc_id for j in judgments}),
        "valid_rate": sum(p.valid for p in parsed) / len(parsed),
        "pairs": {f"{m} ~ {h}": matrix[m][h] for m, h in HUMAN_PAIRS}, "generation": stats,
    }
    rows = [{"doc_id": j.doc_id, "system_id": j.system_id, "ok": p.valid,
             "predicted": f"{p.total:g}" if p.valid else "invalid",
             "human": " / ".join(f"{j.ratings[d]:g}" for d in HUMAN_DIMENSIONS)} for j, p in zip(judgments, parsed)]
    valid = [i for i, p in enumerate(parsed) if p.valid]
    plots = {"scatter_total_vs_human": {
        "kind": "scatter", "x": [humans["mean"][i] for i in valid], "y": [scores["total"][i] for i in valid],
        "xlabel": "mean human rating (1-5)", "ylabel": "predicted total (0-100)",
        "title": "Evaluator total vs mean human rating (valid answers)"}}
    kept = [
        {"index": i, "prompt_excerpt": prompt_excerpt(prompts[i]), "generated": outputs[i],
         "target_text": "human ratings: " + ", ".join(f"{d} {judgments[i].ratings[d]:g}" for d in HUMAN_DIMENSIONS),
         "row": rows[i]}
        for i in range(min(examples, len(judgments)))
    ]
    return {"n": len(judgments), "metrics": metrics, "correlations": matrix, "plots": plots, "examples": kept,
            "rows": rows, "outputs": outputs}


def _correlation_cell(result: dict[str, Any], bold: bool) -> str:
    if result["spearman"] is None:
        return "n/a"
    text = f"{result['spearman']:.3f} / {result['kendall']:.3f}"
    return f"**{text}**" if bold else text


def correlation_table(systems: dict[str, dict[str, Any]], rouge: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The SummEval-style table: each evaluator criterion and ROUGE against each human dimension.

    Args:
        systems: system name -> :func:`evaluate_human_judgments` result.
        rouge: :func:`rouge_correlations`.

    Returns:
        A report table (``title``, ``columns``, ``rows``, ``note``).
    """
    dims = [*HUMAN_DIMENSIONS, "mean"]
    rows = []
    for name, system in systems.items():
        for metric, by_dim in system["correlations"].items():
            rows.append([f"{name}: {metric}",
                         *(_correlation_cell(by_dim[d], (metric, d) in HUMAN_PAIRS) for d in dims)])
    for kind, by_dim in rouge.items():
        rows.append([ROUGE_KINDS[kind], *(_correlation_cell(by_dim[d], False) for d in dims)])
    documents = max((r["documents_total"] for by_dim in rouge.values() for r in by_dim.values()), default=0)
    return {
        "title": "Summary-level correlation with human ratings (Spearman / Kendall tau-b)",
        "columns": ["metric", *dims], "rows": rows,
        "note": f"Per document over its summaries, then the mean over the {documents} documents (those where a side "
                "is constant or fewer than 2 answers were valid are left out; see report.json for counts). "
                "Bold: the criterion's matching human dimension. ROUGE: F1 of the summary against the first reference.",
    }


def limit_documents(judgments: list[Judgment], max_rows: int | None) -> list[Judgment]:
    """At most ``max_rows`` judgments, whole documents only (in order of first appearance; at least one)."""
    if max_rows is None:
        return judgments
    by_doc: dict[str, list[Judgment]] = {}
    for j in judgments:
        by_doc.setdefault(j.doc_id, []).append(j)
    kept: list[Judgment] = []
    for group in by_doc.values():
        if kept and len(kept) + len(group) > max_rows:
            break
        kept += group
    return kept


# ----------------------------------------------------------------------------------------------------- the script


def config_for_eval(args: argparse.Namespace, adapter: str | None) -> RunConfig:
    """The run configuration, with defaults from the adapter's training run.

    When the adapter folder holds ``run_config.json`` (written by training), the model section, the data section
    and the seed default to the training run's (the seed builds the same validation conversations). Anything given
    on the command line overrides them, and a data source given there (``--data``, ``--train-file``,
    ``--val-file``, ``--demo``) replaces all of the training run's.

    Args:
        args: parsed flags of :func:`gemma_lowmem.cli.build_parser`.
        adapter: the adapter folder, or None.

    Returns:
        The validated configuration.
    """
    if adapter is None:
        return config_from_args(args)
    folder = Path(adapter)
    if not (folder / "adapter_config.json").is_file():
        raise UserError(f"{folder}: not an adapter folder (no adapter_config.json)")
    saved_path = folder / "run_config.json"
    if not saved_path.is_file():
        return config_from_args(args)
    saved = read_config_file(saved_path)
    given = given_settings(args)
    data = dict(saved.get("data", {}))
    if DATA_SOURCES & set(given["data"]):  # new data named: the training run's source (its demo flag too) is out
        data = {k: v for k, v in data.items() if k not in DATA_SOURCES}
    inherited = {"model": saved.get("model", {}), "data": data,
                 "train": {k: v for k, v in saved.get("train", {}).items() if k == "seed"}}
    merged = {name: {**inherited.get(name, {}), **given[name]} for name in SECTIONS}
    return RunConfig.from_dict(merged, source=f"{saved_path} and the command line")


def validation_conversations(task: ModuleType, cfg: RunConfig) -> list[Conversation]:
    """The conversations to evaluate: the task's validation set, at most ``data.max_val_samples``.

    With ``data.val_file`` only that file is read: the task builds its data with the file as its only source
    (its "training" rows are the same file and are dropped), so evaluating never loads a training set, from the
    hub or anywhere else, that it does not need.

    Args:
        task: the task module (``build_datasets``).
        cfg: the run configuration.

    Returns:
        The validation conversations.
    """
    data = cfg.data
    if data.val_file:
        data = replace(data, train_file=data.val_file, data=None, demo=False)
    conversations = task.build_datasets(data, cfg.train.seed)[1]
    return conversations[: cfg.data.max_val_samples] if cfg.data.max_val_samples else conversations


def output_dir_for(cfg: RunConfig, options: EvalOptions) -> Path:
    """``--output-dir``, else ``<adapter>/eval`` (``eval-human`` for human judgments), else ``runs/eval-<time>``."""
    if cfg.train.output_dir:
        out = Path(cfg.train.output_dir)
    elif options.adapter:
        out = Path(options.adapter) / ("eval-human" if options.human_judgments else "eval")
    else:
        out = Path("runs") / time.strftime("eval-%Y%m%d-%H%M%S")
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir {out}: exists and is not a folder")
    parent = next(p for p in [out, *out.parents] if p.exists())
    if not os.access(parent, os.W_OK):
        raise UserError(f"--output-dir {out}: {parent} is not writable")
    return out


def run_evaluation(cfg: RunConfig, options: EvalOptions) -> tuple[dict[str, Any], Path, Path]:
    """Load data, the base model and the adapter; evaluate; write the report.

    Everything that can fail on user input (data, judgments file, output folder, model name) is checked before
    the model loads.

    Args:
        cfg: the run configuration (model, data, seed; ``train.output_dir`` is the report folder).
        options: the evaluation options.

    Returns:
        ``(report, report.json path, report.md path)``.
    """
    task = get_task(cfg.data.task)
    out_dir = output_dir_for(cfg, options)
    if options.human_judgments:
        if cfg.data.task != "summary_eval":
            raise UserError(f"--human-judgments grades summaries with the summary_eval rubric; --task is "
                            f"{cfg.data.task}")
        judgments = read_judgments(options.human_judgments)
        judgments = limit_documents(judgments, cfg.data.max_val_samples)
        print(f"{options.human_judgments}: {len(judgments)} rated summaries of "
              f"{len({j.doc_id for j in judgments})} documents")
    else:
        if not hasattr(task, "score_outputs"):
            raise UserError(f"task {cfg.data.task} has no generation metrics (no score_outputs)")
        conversations = validation_conversations(task, cfg)
        if not conversations:
            raise UserError("no validation conversations to evaluate; check --data / --val-file")
        print(f"evaluating on {len(conversations)} validation conversations")
    model_path = resolve_model_path(cfg.model.model)
    device = default_device()
    tokenizer = load_tokenizer(model_path)
    model = load_base_model(cfg.model, device, cfg.train.precision)
    if options.adapter:
        model = load_adapter(model, options.adapter)
    common = {"max_new_tokens": cfg.eval.max_new_tokens, "batch_size": cfg.eval.gen_batch_size,
              "system_role": cfg.model.system_role, "show_progress": options.show_progress,
              "examples": cfg.eval.report_examples, "mode": cfg.eval.mode,
              "autocast": resolve_precision(device, cfg.train.precision).autocast}
    settings = {"task": cfg.data.task, "adapter": options.adapter, "device": str(device),
                "eval": asdict(cfg.eval),
                "seed": cfg.train.seed, "model": asdict(cfg.model)}
    if options.human_judgments:
        systems = evaluate_systems(model, options.compare, lambda m: evaluate_human_judgments(
            m, tokenizer, judgments, lang=cfg.data.lang, max_article_length=cfg.data.max_article_length, **common))
        rouge = rouge_correlations(judgments)
        report = {"settings": {**settings, "human_judgments": options.human_judgments, "lang": cfg.data.lang},
                  "systems": systems, "rouge_correlations": rouge, "tables": [correlation_table(systems, rouge)]}
        title = f"Evaluator vs human judgments: {Path(options.human_judgments).name}"
    else:
        systems = evaluate_systems(model, options.compare, lambda m: evaluate_model(
            m, tokenizer, conversations, task, **common))
        report = {"settings": {**settings, "data": asdict(cfg.data)}, "systems": systems}
        title = f"Evaluation: {cfg.data.task}" + (f" ({options.adapter})" if options.adapter else "")
    json_path, md_path = write_report(report, out_dir, title)
    return report, json_path, md_path
