"""Guided rubric decoding: the code writes the answer's fixed text, the model writes only the slots.

The answer format is :func:`~gemma_lowmem.evaluation.rubric.rubric_template` of a
:class:`~gemma_lowmem.evaluation.rubric.RubricSpec` (the caller's: each task has its own, in Korean or English):
fixed text (title, headings, labels, ``/max``) and slots. The fixed text is fed to the model as tokens, exactly as
training tokenized it (Gemma writes every digit and newline as a token of its own, so the pieces tokenize alone as
they do inside the whole answer); the slots are read from the model:

- **Score slots**: the model's distribution over every allowed integer 0..max. A number's probability is the
  product over its digit tokens and the token that ends it (the ``/`` of ``24/30``). All numbers are prefixes of
  each other's digit strings, so they form a tree with one node per number; :meth:`Decoder.branch` reads the
  next-token distribution after every node in one forward pass over the cache (101 tokens for 0..100), then drops
  them. Recorded: the argmax (written into the answer), the expected score ``sum p(s) * s`` over the distribution
  renormalised to the allowed range (G-Eval's weighting), and the mass the model put in that range.
- **Free-text slots** (each criterion's comment, the overall feedback, the suggestions): greedy until the slot ends
  (a newline; a blank line or the end of the turn for the suggestions, which are bullet lines), each with its own
  token cap (:data:`SLOT_TOKENS`) so one rambling slot cannot eat the budget.

The total is the sum of the criteria's scores (the rubric defines it so, and :func:`parse_rubric` checks it). The
format puts it after the criteria, so the code writes it: there is nothing left for the model to judge, and
``expected_total`` is the sum of the criteria's expected scores (linearity of expectation). Why not first (the
format until 2026-12): a total read first must hold the whole judgement in one slot of 101 values before any
criterion, and the 270M adapter trained so wrote nearly the same distribution there for every summary (its mean
expected total 52.9 for empty summaries, 59.0 for near-reference ones); the criteria-first format ranks summaries
better at the same training cost (the README's evaluator-quality section).

Modes (:data:`MODES`): ``free`` (plain greedy generation, parsed; kept for comparison), ``guided`` (every slot) and
``scores`` (score slots only: the comments and texts are left empty, for fast batch grading). ``guided`` and
``scores`` give a valid answer by construction.

The mode and the other decoding settings (token caps, batch size, the prompts' system turn, autocast, the memory
budget of the float weight copies, the progress bar) travel as one :class:`Decoding` value, from the flags or the
run's config down to the decoder.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from gemma_lowmem.config import EVAL_MODES as MODES
from gemma_lowmem.evaluation.generate import (
    Autocast,
    Decoder,
    generate_texts,
    length_sorted_batches,
    stop_token_ids,
    token_ids_containing,
)
from gemma_lowmem.evaluation.rubric import RubricSpec, Slot, render_rubric, rubric_template
from gemma_lowmem.evaluation.rubric_parse import RubricResult, parse_rubric
from gemma_lowmem.memory import parse_size

if TYPE_CHECKING:
    from gemma_lowmem.config import RunConfig

SLOT_TOKENS: Mapping[str, int] = {"comment": 48, "feedback": 160, "suggestions": 128}
"""Token cap of each free-text slot (the summary task's targets: comments 10-35 tokens, feedback 20-120)."""
_LEADING_DASH = re.compile(r"^[\s\-–—:]+")  # the " - " between a score and its comment


@dataclass(frozen=True)
class Decoding:
    """How a model answers prompts: one value from the flags or the run's config down to the decoder.

    Attributes:
        mode: how a rubric answer is decoded, one of :data:`MODES`: ``guided`` (every slot), ``scores`` (score
            slots only) or ``free`` (plain generation, parsed); answers without a rubric are always free.
        max_new_tokens: the longest free answer in tokens; in ``guided`` mode also the cap of every free-text slot.
        batch_size: prompts per batch (sorted by length, so each batch pads little).
        system_role: render a prompt's system turn as one (else it is folded into the first user turn), as the
            model was trained (Gemma: False).
        autocast: zero-argument callable returning the context manager of every forward (training's
            ``Precision.autocast``).
        memory_budget: a budget in bytes for the int8 layers' float copies kept while decoding
            (:func:`~gemma_lowmem.model.float_weight_cache`); None: what the device has free.
        show_progress: show a progress bar.
        slot_tokens: ``guided`` mode's cap per free-text slot kind (``comment``, ``feedback``, ``suggestions``);
            None: :data:`SLOT_TOKENS`.
    """

    mode: str = "guided"
    max_new_tokens: int = 384
    batch_size: int = 8
    system_role: bool = False
    autocast: Autocast = contextlib.nullcontext
    memory_budget: int | None = None
    show_progress: bool = True
    slot_tokens: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Decoding.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("max_new_tokens", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"Decoding.{name}={getattr(self, name)!r} must be > 0")

    @classmethod
    def from_config(cls, cfg: RunConfig, autocast: Autocast, show_progress: bool = True) -> Decoding:
        """The decoding a run's config asks for: ``eval.mode``, ``eval.max_new_tokens`` and ``eval.gen_batch_size``,
        the model's ``system_role``, and ``train.max_mem`` as the memory budget.

        Args:
            cfg: the run configuration.
            autocast: training's autocast for the device (``resolve_precision(device, precision).autocast``).
            show_progress: show a progress bar.

        Returns:
            The settings.
        """
        return cls(mode=cfg.eval.mode, max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.gen_batch_size,
                   system_role=cfg.model.system_role, autocast=autocast, memory_budget=parse_size(cfg.train.max_mem),
                   show_progress=show_progress)


@dataclass
class ScoreReading:
    """What the model's distribution says about one score slot.

    Attributes:
        value: the most probable allowed integer (written into the answer).
        expected: ``sum p(s) * s`` over the allowed integers, ``p`` renormalised to them.
        mass: the probability of writing an allowed integer (then the end of the number) at all.
    """

    value: int
    expected: float
    mass: float


@dataclass
class RubricAnswer:
    """One graded answer.

    Attributes:
        text: the answer: the rendered guided answer, or the generated text in ``free`` mode.
        result: ``parse_rubric(text, spec)``: scores, total, texts, validity (None: a free answer of a task
            without a rubric, not parsed).
        readings: criterion key -> :class:`ScoreReading`; empty in ``free`` mode.
        expected_total: the sum of the criteria's expected scores (None in ``free`` mode).
    """

    text: str
    result: RubricResult | None
    readings: dict[str, ScoreReading] = field(default_factory=dict)
    expected_total: float | None = None


def _digit_ids(tokenizer: Any) -> list[int]:
    ids = [tokenizer(str(d), add_special_tokens=False)["input_ids"] for d in range(10)]
    if any(len(i) != 1 for i in ids):
        raise ValueError("guided decoding needs a tokenizer that writes each digit as one token (Gemma's does)")
    return [i[0] for i in ids]


def read_score(decoder: Decoder, maximum: int, digit_ids: Sequence[int], end_id: int
               ) -> tuple[list[ScoreReading], torch.Tensor]:
    """Read every row's distribution over the integers 0..``maximum`` at the cache's end.

    Args:
        decoder: the rows, each ending right before the number.
        maximum: the slot's maximum.
        digit_ids: the token of each digit 0-9.
        end_id: the token that follows a number in the answer (``/``).

    Returns:
        Per row its reading, and the (rows, maximum + 1) log-probabilities of the integers (not renormalised).
    """
    nodes = [str(s) for s in range(maximum + 1)]  # node s is the number s; its parent is s without its last digit
    parents = [-1 if len(n) == 1 else int(n[:-1]) for n in nodes]
    first = decoder.log_probs(digit_ids)  # (B, 10)
    after = decoder.branch([digit_ids[int(n[-1])] for n in nodes], parents, [*digit_ids, end_id])  # (B, S, 11)
    path: list[torch.Tensor] = []  # log p(digits of s), (B,) each
    for s, n in enumerate(nodes):
        digit = int(n[-1])
        path.append(first[:, digit] if parents[s] < 0 else path[parents[s]] + after[:, parents[s], digit])
    logp = torch.stack(path, dim=1) + after[:, :, 10]  # (B, S): ... and then the end of the number
    probs = torch.softmax(logp, dim=1)
    values = torch.arange(maximum + 1, dtype=probs.dtype, device=probs.device)
    readings = [ScoreReading(int(v), float(e), float(m)) for v, e, m in zip(
        logp.argmax(1).tolist(), (probs * values).sum(1).tolist(), torch.logsumexp(logp, 1).exp().tolist())]
    return readings, logp


def _slot_stops(tokenizer: Any) -> dict[str, list[int]]:
    """Stop ids of each free-text slot kind: the end of the turn, and a newline (a blank line for suggestions)."""
    end = stop_token_ids(tokenizer)
    line = sorted({*end, *token_ids_containing(tokenizer, "\n")})
    return {"comment": line, "feedback": line,
            "suggestions": sorted({*end, *token_ids_containing(tokenizer, "\n\n")})}


@torch.no_grad()
def _guided_batch(model: torch.nn.Module, tokenizer: Any, prompts: list[list[int]], template: list[str | Slot],
                  spec: RubricSpec, lang: str, mode: str, slot_tokens: Mapping[str, int],
                  autocast: Autocast) -> list[RubricAnswer]:
    digits = _digit_ids(tokenizer)
    stops = _slot_stops(tokenizer) if mode == "guided" else {}
    decoder = Decoder(model, prompts, pad_id=tokenizer.pad_token_id, autocast=autocast)
    rows = range(decoder.rows)
    pending: list[list[int]] = [[] for _ in rows]  # tokens each row still has to be fed
    readings: list[dict[str, ScoreReading]] = [{} for _ in rows]
    texts: list[dict[str, str]] = [{} for _ in rows]
    for i, part in enumerate(template):
        if isinstance(part, str):
            ids = tokenizer(part, add_special_tokens=False)["input_ids"]
            pending = [p + ids for p in pending]
            continue
        if part.kind != "score" and mode == "scores":
            continue
        if part.key == "total":  # after every criterion: their sum, written by the code
            pending = [p + [digits[int(d)] for d in str(sum(readings[r][k].value for k in spec.criteria))]
                       for r, p in zip(rows, pending)]
            continue
        decoder.feed(pending)
        if part.kind == "score":
            following = template[i + 1]
            assert isinstance(following, str), "a score is followed by fixed text (its /max)"
            end_id = tokenizer(following, add_special_tokens=False)["input_ids"][0]
            found, _ = read_score(decoder, spec.criteria[part.key][0], digits, end_id)
            for r in rows:
                readings[r][part.key] = found[r]
            pending = [[digits[int(d)] for d in str(found[r].value)] for r in rows]
        else:
            new = decoder.greedy(stops[part.kind], slot_tokens[part.kind])
            pending = [[] for _ in rows]
            for r in rows:
                texts[r][part.key or part.kind] = tokenizer.decode(new[r], skip_special_tokens=True).strip()
    answers = []
    for r in rows:
        scores = {key: readings[r][key].value for key in spec.criteria}
        comments = {key: _LEADING_DASH.sub("", texts[r].get(key, "")) for key in spec.criteria}
        text = render_rubric(scores, texts[r].get("feedback", ""), texts[r].get("suggestions", ""), comments, lang,
                             spec)
        expected = math.fsum(readings[r][key].expected for key in spec.criteria)
        answers.append(RubricAnswer(text, parse_rubric(text, spec), readings[r], expected))
    return answers


def rubric_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    spec: RubricSpec,
    lang: str,
    decoding: Decoding,
) -> list[RubricAnswer]:
    """Answer rendered rubric prompts in ``decoding.mode``.

    Args:
        model: the evaluator (a PEFT model answers with its active adapter).
        tokenizer: its tokenizer (``guided``/``scores``: one token per digit).
        prompts: rendered prompts, generation prompt included (they hold their special tokens).
        spec: the rubric.
        lang: the answer's language (one of ``spec.titles``).
        decoding: the mode (see the module docstring), token caps (each slot's at most ``max_new_tokens``), batch
            size, autocast and progress bar; its ``system_role`` and ``memory_budget`` are the caller's (the
            prompts come rendered, the float weight copies are the caller's to keep).

    Returns:
        One answer per prompt, in order.
    """
    mode = decoding.mode
    if mode == "free":
        texts = generate_texts(model, tokenizer, prompts, max_new_tokens=decoding.max_new_tokens,
                               batch_size=decoding.batch_size, show_progress=decoding.show_progress,
                               autocast=decoding.autocast)
        return [RubricAnswer(t, parse_rubric(t, spec)) for t in texts]
    template = rubric_template(lang, spec)
    caps = {kind: min(cap, decoding.max_new_tokens) for kind, cap in (decoding.slot_tokens or SLOT_TOKENS).items()}
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    answers: list[RubricAnswer | None] = [None] * len(prompts)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc=f"grading ({mode})", unit="prompt", disable=not decoding.show_progress,
               leave=False)
    for batch in length_sorted_batches([len(i) for i in ids], decoding.batch_size):
        done = _guided_batch(model, tokenizer, [ids[i] for i in batch], template, spec, lang, mode, caps,
                             decoding.autocast)
        for i, answer in zip(batch, done):
            answers[i] = answer
        bar.update(len(batch))
    bar.close()
    model.train(was_training)
    return [a for a in answers if a is not None]
