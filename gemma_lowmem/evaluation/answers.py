"""Evaluation by generation: answer prompts (free or guided by a rubric), score the answers, compare systems.

The evaluation that reads graded answers, beside the loop's loss on validation rows (``train.validation_loss``):
:func:`answer_and_score` answers each conversation's prompt and scores the answers with the task's
``score_outputs``; :func:`compare_systems` runs it for the base model (adapter disabled, no second copy in
memory) and the adapter. Imports no task, no CLI and no training code: the caller passes the scoring function and
the rubric.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from peft import PeftModel

from gemma_lowmem.data.conversation import Conversation, Message
from gemma_lowmem.data.tokenize import render
from gemma_lowmem.errors import UserError
from gemma_lowmem.evaluation.generate import generate_texts
from gemma_lowmem.evaluation.guided import Decoding, RubricAnswer, rubric_answers
from gemma_lowmem.evaluation.metrics import agreement
from gemma_lowmem.evaluation.rubric import RubricSpec
from gemma_lowmem.memory import PeakMemory
from gemma_lowmem.model import float_weight_cache

EXAMPLES = 5  # examples shown in the report
PROMPT_HEAD, PROMPT_TAIL = 300, 900  # characters of a prompt shown in the report: its start and its end
# score_outputs(conversations, outputs) -> {"metrics", "rows", "plots"}: a task's scoring of generated answers
ScoreOutputs = Callable[[list[Conversation], list[str]], dict[str, Any]]


def prompt_excerpt(prompt: str, head: int = PROMPT_HEAD, tail: int = PROMPT_TAIL) -> str:
    """The start and the end of a long prompt (the end holds the question), the middle replaced by a marker."""
    if len(prompt) <= head + tail + 200:  # cutting less than that would not make it shorter to read
        return prompt
    return f"{prompt[:head]}\n[... {len(prompt) - head - tail:,} characters ...]\n{prompt[-tail:]}"


def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    message_lists: list[list[Message]],
    decoding: Decoding,
    *,
    rubric: RubricSpec | None = None,
    lang: str = "ko",
) -> tuple[list[str], list[RubricAnswer], dict[str, Any]]:
    """Render each message list with a generation prompt and answer it (free greedy, or guided by a rubric).

    Args:
        model: the causal LM (a PEFT model generates with its active adapter).
        tokenizer: its tokenizer.
        message_lists: the turns before each answer.
        decoding: how to render and decode (:class:`~gemma_lowmem.evaluation.guided.Decoding`): its ``mode``
            holds for a rubric (without one the answers are free); the int8 layers' float copies kept while
            decoding (:func:`~gemma_lowmem.model.float_weight_cache`) fit in what is free within its
            ``memory_budget`` (the run's ``--max-mem``).
        rubric: the answers' :class:`~gemma_lowmem.evaluation.rubric.RubricSpec` (None: not a rubric task).
        lang: the answers' language.

    Returns:
        ``(prompts, answers, stats)``; stats: ``mode``, ``prompts``, ``seconds``, ``seconds_per_answer``,
        ``prompt_tokens_mean``/``_max``, ``answer_tokens`` (the answers re-tokenized: the stop token and special
        tokens are not counted), ``answer_tokens_per_s``, ``peak_memory_gib`` (CUDA allocated and reserved, or
        CPU peak RSS, of this phase), ``float_weights`` (GiB of float copies kept, layers left on the kernel).
    """
    mode = decoding.mode if rubric is not None else "free"
    prompts = [render(tokenizer, m, add_generation_prompt=True, system_role=decoding.system_role)
               for m in message_lists]
    device = next(model.parameters()).device
    peak = PeakMemory(device)
    peak.reset()
    start = time.perf_counter()
    with float_weight_cache(model, budget=decoding.memory_budget) as weights:
        if rubric is None:  # free answers, nothing to parse
            texts = generate_texts(model, tokenizer, prompts, max_new_tokens=decoding.max_new_tokens,
                                   batch_size=decoding.batch_size, show_progress=decoding.show_progress,
                                   autocast=decoding.autocast)
            answers = [RubricAnswer(text, None) for text in texts]
        else:
            answers = rubric_answers(model, tokenizer, prompts, spec=rubric, lang=lang, decoding=decoding)
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


def answer_and_score(
    model: torch.nn.Module,
    tokenizer: Any,
    conversations: list[Conversation],
    score_outputs: ScoreOutputs,
    decoding: Decoding,
    *,
    rubric: RubricSpec | None = None,
    examples: int = EXAMPLES,
) -> dict[str, Any]:
    """Answer each conversation's prompt (all turns but the last) and score the answers.

    With a ``rubric`` the answers are decoded in ``decoding.mode`` (guided by default: every answer is valid and
    each score comes with its expected value); without one they are generated freely.

    Args:
        model: the causal LM; a PEFT model generates with its adapter (inside ``disable_adapter()``: without).
        tokenizer: its tokenizer.
        conversations: the evaluation conversations; the last turn of each is the target answer.
        score_outputs: the task's ``score_outputs(conversations, outputs)``: metrics, rows and plot specs.
        decoding: how to render and decode, as in :func:`generate_answers`.
        rubric: the answers' rubric (a task's ``Task.rubric``); None: free generation.
        examples: how many examples (prompt excerpt, answer, target, scores) to keep for the report.

    Returns:
        One system's report part: ``n``; ``metrics`` (the task's, plus ``generation``: mode, time, tokens/s,
        peak memory; guided modes add ``expected_agreement``: the expected scores against the targets);
        ``plots``; ``examples``; ``rows`` (the task's per-example rows, guided modes
        with each answer's ``expected_total``); ``outputs`` (every answer).
    """
    if not conversations:
        raise ValueError("no conversations to evaluate")
    prompts, answers, stats = generate_answers(model, tokenizer, [c.messages[:-1] for c in conversations], decoding,
                                               rubric=rubric, lang=conversations[0].meta.get("lang", "ko"))
    outputs = [a.text for a in answers]
    scored = score_outputs(conversations, outputs)
    if rubric is not None and stats["mode"] != "free":
        scored["metrics"]["expected_agreement"] = expected_agreement(conversations, answers, rubric)
        for row, answer in zip(scored["rows"], answers):
            row["expected_total"] = answer.expected_total
    kept = [
        {"index": i, "prompt_excerpt": prompt_excerpt(prompts[i]), "generated": outputs[i],
         "target_text": conversations[i].messages[-1]["content"], "row": scored["rows"][i]}
        for i in range(min(examples, len(conversations)))
    ]
    return {"n": len(conversations), "metrics": {**scored["metrics"], "generation": stats},
            "plots": scored["plots"], "examples": kept, "rows": scored["rows"], "outputs": outputs}


def expected_agreement(conversations: list[Conversation], answers: list[RubricAnswer], rubric: RubricSpec
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


def compare_systems(
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
