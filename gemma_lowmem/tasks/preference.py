"""Task 4, pairwise preference tuning: prompts with a chosen and a rejected answer, trained with DPO or IPO.

Two task values: :data:`DPO` (``--task preference``) trains the preference objective of :mod:`gemma_lowmem.dpo`
through :func:`prepare_training`; :data:`SFT` (``--task preference_sft``) trains plain SFT on (prompt -> chosen),
the usual warm-up before DPO, from the same data (:func:`build_datasets` gives those conversations).

Data: a JSONL/CSV/Parquet file, the bundled demo set (``preference_demo.jsonl``) or the hub set
``Anthropic/hh-rlhf``. A row takes one of these forms:

- ``prompt``, ``chosen``, ``rejected`` as plain text: the prompt is one user turn;
- ``prompt`` as an Anthropic HH dialogue (``"Human: ...\\n\\nAssistant: ...\\n\\nHuman: ...\\n\\nAssistant:"``)
  and the two final answers: the dialogue becomes user/assistant turns;
- ``chosen`` and ``rejected`` as whole HH dialogues (the hub set's form): the shared prefix up to the last
  ``"\\n\\nAssistant:"`` both contain is the prompt, what follows in each is its answer.

A row whose answers are empty or identical, whose dialogues share no prefix or differ before the final assistant
turn, is an error naming file and record (skipped and counted with ``skip_bad_rows``). Every prompt starts with a
system text for an educational assistant (Korean, or English with ``lang="en"``); Gemma folds it into the first user
turn. A pair row holds the prompt twice and both answers and must fit ``max_seq_length`` tokens: longer ones lose
their earliest dialogue exchanges first, and are dropped (counted) when a single exchange is still too long.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import statistics
from pathlib import Path
from typing import Any

import torch

from gemma_lowmem.config import DataConfig, RunConfig
from gemma_lowmem.data.conversation import Conversation, Message
from gemma_lowmem.data.tokenize import encode_messages
from gemma_lowmem.dpo import dpo_objective, pair_example
from gemma_lowmem.errors import UserError
from gemma_lowmem.evaluation.rouge import rouge_pair
from gemma_lowmem.tasks import Task, TaskTraining
from gemma_lowmem.tasks.sources import BadRow, HubSet, LoadedRows, MissingField, Row, load_rows
from gemma_lowmem.text import detect_lang

log = logging.getLogger(__name__)

DEMO_FILE = Path(__file__).parents[1] / "data" / "demo" / "preference_demo.jsonl"
HUB = HubSet("Anthropic/hh-rlhf", None, "train", "test")
FIELDS = ("id", "prompt", "chosen", "rejected", "lang", "topic")  # what --columns may map

SYSTEM_PROMPTS = {
    "ko": (
        "당신은 학생들의 질문에 답하는 신중한 교육용 도우미입니다. 민감하거나 윤리적인 주제에 대해서도 균형 잡히고 "
        "사실에 근거하며 학생의 나이에 맞게 답하세요. 도움이 될 때는 믿을 만한 자료나 주변의 믿을 수 있는 어른을 "
        "안내하고, 학생이 스스로 생각해 볼 수 있도록 격려하세요."
    ),
    "en": (
        "You are a careful educational assistant answering students' questions. Even on sensitive or ethical topics, "
        "answer in a balanced, factual and age-appropriate way. Where it helps, point to trustworthy sources or "
        "trusted adults, and encourage the student to think the question through."
    ),
}

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}


# ------------------------------------------------------------------------------------------------------ HH dialogues


def _is_dialogue(text: str) -> bool:
    return text.lstrip("\n").startswith("Human:") and ASSISTANT in text


def parse_dialogue(text: str) -> list[Message]:
    """An Anthropic HH dialogue -> user/assistant messages.

    A trailing empty ``Assistant:`` (the slot of the answer) is dropped; consecutive turns of the same speaker are
    joined with a blank line, so roles alternate as chat templates require.

    Args:
        text: ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` (the leading blank line may be missing).

    Returns:
        Messages starting with a user turn.

    Raises:
        BadRow: text before the first ``Human:``, or no turn at all.
    """
    text = "\n\n" + text.lstrip("\n") if text.lstrip("\n").startswith("Human:") else text
    parts = _TURN.split(text)  # [before, speaker, content, speaker, content, ...]
    if parts[0].strip():
        raise BadRow(f"dialogue text before its first 'Human:' turn ({parts[0].strip()[:40]!r}); "
                     "an HH dialogue starts with '\\n\\nHuman:'")
    messages: list[Message] = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        role, content = _ROLES[speaker], content.strip()
        if messages and messages[-1]["role"] == role:
            messages[-1] = {"role": role, "content": f"{messages[-1]['content']}\n\n{content}".strip()}
        else:
            messages.append({"role": role, "content": content})
    if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
        messages.pop()
    if not messages or messages[0]["role"] != "user":
        raise BadRow("the dialogue has no 'Human:' turn to start it")
    return messages


def split_hh_pair(chosen: str, rejected: str) -> tuple[list[Message], str, str]:
    """Split two whole HH dialogues into their shared prompt and their final assistant answers.

    The prompt ends at the last ``"\\n\\nAssistant:"`` that lies entirely inside the dialogues' common prefix (the
    answers themselves may share a first word or two).

    Args:
        chosen: the preferred dialogue.
        rejected: the dispreferred dialogue.

    Returns:
        (prompt messages ending with a user turn, chosen answer, rejected answer), answers stripped.

    Raises:
        BadRow: no shared prefix ending in an assistant turn, dialogues that differ before their final assistant
            turn, an empty answer, or identical answers.
    """
    common = len(os.path.commonprefix([chosen, rejected]))
    end = chosen.rfind(ASSISTANT, 0, common)
    while end >= 0 and end + len(ASSISTANT) > common:
        end = chosen.rfind(ASSISTANT, 0, end)
    if end < 0:
        raise BadRow("'chosen' and 'rejected' share no dialogue prefix ending in '\\n\\nAssistant:'; give a "
                     "'prompt' field with the two answers, or the two whole dialogues of one conversation")
    answers = [text[end + len(ASSISTANT):] for text in (chosen, rejected)]
    for name, answer in zip(("chosen", "rejected"), answers):
        if HUMAN in answer or ASSISTANT in answer:
            raise BadRow(f"'chosen' and 'rejected' differ before their final assistant turn ('{name}' goes on "
                         "with more turns); only the final answer may differ")
    messages = parse_dialogue(chosen[:end])
    if messages[-1]["role"] != "user":
        raise BadRow("the shared dialogue ends with an assistant turn; the answers must follow a 'Human:' turn")
    return messages, *_check_answers(answers[0], answers[1])


def _check_answers(chosen: Any, rejected: Any) -> tuple[str, str]:
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise BadRow(f"field '{name}' must be text, got {type(value).__name__}")
        if not value.strip():
            raise BadRow(f"field '{name}' is empty; a pair needs two non-empty answers")
    if chosen.strip() == rejected.strip():
        raise BadRow("'chosen' and 'rejected' are identical; a pair needs two different answers")
    return chosen.strip(), rejected.strip()


# ----------------------------------------------------------------------------------------------------------- rows


def normalise(row: Row) -> Row:
    """One raw row -> ``{"id", "lang", "topic", "messages", "chosen", "rejected"}`` (forms: module docstring).

    Args:
        row: a dict from a file or the hub.

    Returns:
        The row with ``messages`` the prompt turns (no system text; the last one a user turn).

    Raises:
        BadRow: naming the field and the fix.
    """
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            raise MissingField(name, f"missing field '{name}' (fields present: {', '.join(row) or 'none'})")
    if isinstance(chosen, str) and isinstance(rejected, str) and _is_dialogue(chosen) and _is_dialogue(rejected):
        messages, chosen, rejected = split_hh_pair(chosen, rejected)
    elif prompt is None:
        raise MissingField("prompt", "missing field 'prompt' (or give 'chosen' and 'rejected' as whole HH "
                                     f"dialogues) (fields present: {', '.join(row) or 'none'})")
    elif not isinstance(prompt, str) or not prompt.strip():
        raise BadRow("field 'prompt' must be non-empty text")
    else:
        messages = parse_dialogue(prompt) if _is_dialogue(prompt) else [{"role": "user", "content": prompt.strip()}]
        if messages[-1]["role"] != "user":
            raise BadRow("field 'prompt' ends with an assistant turn; it must end with the user's question")
        chosen, rejected = _check_answers(chosen, rejected)
    text = messages[-1]["content"]
    lang = row.get("lang") if row.get("lang") in ("ko", "en") else detect_lang(text + " " + chosen)
    row_id = row.get("id")
    if row_id in (None, ""):  # stable across runs: from the content, not the position
        row_id = "pair-" + hashlib.sha1(f"{text}\0{chosen}\0{rejected}".encode()).hexdigest()[:10]
    return {"id": str(row_id), "lang": lang, "topic": row.get("topic"), "messages": messages, "chosen": chosen,
            "rejected": rejected}


def load_pairs(cfg: DataConfig) -> LoadedRows:
    """Training and validation pairs named by ``cfg`` (demo set: a fifth held out, the same share per language).

    Args:
        cfg: the data configuration.

    Returns:
        The normalised rows and the skipped ones.
    """
    data = load_rows(cfg, normalise, fields=FIELDS, demo_file=DEMO_FILE, hub=HUB, group="lang" if cfg.demo else None)
    log.info("%s: %d training pairs, %d validation pairs", data.source, len(data.train), len(data.val))
    return data


def prompt_messages(row: Row, lang: str) -> list[Message]:
    """The system text in ``lang`` followed by the row's prompt turns."""
    if lang not in SYSTEM_PROMPTS:
        raise UserError(f"lang={lang!r} is not one of {', '.join(SYSTEM_PROMPTS)}")
    return [{"role": "system", "content": SYSTEM_PROMPTS[lang]}, *row["messages"]]


# -------------------------------------------------------------------------------------------------------- SFT view


def build_conversations(rows: list[Row], lang: str) -> list[Conversation]:
    """SFT conversations (prompt -> chosen answer); ``meta`` keeps id, lang, topic and the rejected answer.

    Args:
        rows: normalised rows (e.g. from :func:`load_pairs`).
        lang: language of the system text.

    Returns:
        One conversation per row, in order.
    """
    return [Conversation(prompt_messages(row, lang) + [{"role": "assistant", "content": row["chosen"]}],
                         meta={"id": row["id"], "lang": row["lang"], "topic": row["topic"],
                               "rejected": row["rejected"]})
            for row in rows]


def build_datasets(cfg: DataConfig, seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """(train, validation) SFT conversations of (prompt -> chosen): the warm-up data and the evaluation prompts.

    Args:
        cfg: the data configuration.
        seed: unused (nothing is drawn); kept for the task interface.

    Returns:
        Training and validation conversations.
    """
    data = load_pairs(cfg)
    return build_conversations(data.train, cfg.lang), build_conversations(data.val, cfg.lang)


# ------------------------------------------------------------------------------------------------------ pair tokens


def encode_pair(tokenizer: Any, messages: list[Message], chosen: str, rejected: str, max_len: int,
                system_role: bool = False) -> tuple[dict[str, Any] | None, bool]:
    """Tokenize a pair into one example of :func:`gemma_lowmem.dpo.pair_example`, fitting ``max_len`` tokens.

    While the pair row (prompt twice, both answers) is too long and the prompt holds more than one user turn, the
    earliest exchange (a user turn and the assistant reply after it) is dropped.

    Args:
        tokenizer: the model's tokenizer.
        messages: prompt messages (a system message first is kept), ending with a user turn.
        chosen: the preferred answer.
        rejected: the dispreferred answer.
        max_len: most tokens of the pair row.
        system_role: the template takes a system turn (else it is folded into the first user turn).

    Returns:
        (the example or None when even the last exchange does not fit, whether exchanges were dropped).
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    shortened = False
    while True:
        prompt = system + turns
        sides = [encode_messages(tokenizer, prompt + [{"role": "assistant", "content": answer}], system_role)
                 for answer in (chosen, rejected)]
        if sum(len(s["input_ids"]) for s in sides) <= max_len:
            return pair_example(*sides), shortened
        if sum(m["role"] == "user" for m in turns) < 2:
            return None, False
        turns, shortened = turns[2:], True


def encode_pairs(tokenizer: Any, rows: list[Row], cfg: RunConfig, desc: str) -> list[dict[str, Any]]:
    """Pair examples of rows (logging how many lost early exchanges or were dropped as too long)."""
    examples, n_short, n_dropped = [], 0, 0
    for row in rows:
        example, shortened = encode_pair(tokenizer, prompt_messages(row, cfg.data.lang), row["chosen"],
                                         row["rejected"], cfg.data.max_seq_length, cfg.model.system_role)
        if example is None:
            n_dropped += 1
            continue
        n_short += shortened
        examples.append(example)
    if n_short or n_dropped:
        print(f"{desc}: {n_short} pairs lost early dialogue turns to fit {cfg.data.max_seq_length} tokens per pair "
              f"row, {n_dropped} dropped (too long even then)")
    return examples


def prepare_training(cfg: RunConfig, tokenizer: Any, model: torch.nn.Module) -> TaskTraining:
    """The pairs of ``cfg.data`` as pair examples, with the objective of :func:`~gemma_lowmem.dpo.dpo_objective`.

    Args:
        cfg: the run configuration (DPO settings in ``cfg.preference``).
        tokenizer: the model's tokenizer.
        model: the policy (base + LoRA).

    Returns:
        The examples (with reference log-probabilities), loss and collation for ``fit``.
    """
    data = load_pairs(cfg.data)
    train = encode_pairs(tokenizer, data.train, cfg, "train pairs")
    val = encode_pairs(tokenizer, data.val, cfg, "val pairs")
    if not train:
        raise UserError(f"no training pair fits --max-seq-length {cfg.data.max_seq_length} (a pair row holds the "
                        "prompt twice and both answers); raise it")
    return TaskTraining(*dpo_objective(cfg, model, tokenizer.pad_token_id, train, val))


# --------------------------------------------------------------------------------------------------------- scoring

_HELP = re.compile(
    r"teacher|counsel+or|trusted adult|parent|guardian|helpline|hotline|crisis line|doctor|librar|sources?\b|"
    r"fact-check|선생님|상담|어른|보호자|부모|전문가|출처|자료|기관|도서관",
    re.IGNORECASE,
)


def score_outputs(conversations: list[Conversation], outputs: list[str]) -> dict[str, Any]:
    """Simple indicators of generated answers on held-aside prompts (run it for the model before and after).

    - length: characters and whitespace-separated words (``empty_rate``: answers that are blank);
    - ``rouge1_chosen`` / ``rouge1_rejected``: ROUGE-1 F1 against the chosen and the rejected answer, and
      ``closer_to_chosen_rate``, the share of answers strictly closer to the chosen one (a word-overlap proxy
      for which side an answer resembles, not a judgement of quality);
    - ``mentions_help_rate``: answers that name trusted people or sources (teacher, counsellor, parent,
      sources, 선생님, 상담, 출처, ...), a trait of the demo set's chosen answers.

    Args:
        conversations: from :func:`build_conversations` (the last message is the chosen answer, ``meta`` holds
            ``rejected``).
        outputs: the generated answer of each conversation, same order.

    Returns:
        ``metrics`` (above, plus ``chosen_mean_chars`` and ``chosen_mentions_help_rate`` of the chosen answers for
        comparison); ``rows`` per example ``id``, ``topic``, ``lang``, ``prompt`` (excerpt), ``output``, ``chars``,
        ``words``, ``rouge1_chosen``, ``rouge1_rejected``, ``closer_to_chosen``, ``mentions_help``; ``plots``:
        ``rouge_scatter`` (ROUGE-1 to chosen vs to rejected) and ``indicators`` (bar of the rates).
    """
    if len(conversations) != len(outputs):
        raise ValueError(f"{len(conversations)} conversations but {len(outputs)} outputs; they must pair up")
    if not conversations:
        raise ValueError("no conversations to score")
    rows = []
    for conv, output in zip(conversations, outputs):
        chosen, rejected = conv.messages[-1]["content"], conv.meta["rejected"]
        to_chosen = rouge_pair(output, chosen)["rouge1"].fmeasure
        to_rejected = rouge_pair(output, rejected)["rouge1"].fmeasure
        prompt = conv.messages[-2]["content"]
        rows.append({
            "id": conv.meta.get("id"), "topic": conv.meta.get("topic"), "lang": conv.meta.get("lang"),
            "prompt": prompt if len(prompt) <= 200 else prompt[:200] + "…", "output": output,
            "chars": len(output.strip()), "words": len(output.split()), "rouge1_chosen": to_chosen,
            "rouge1_rejected": to_rejected, "closer_to_chosen": to_chosen > to_rejected,
            "mentions_help": bool(_HELP.search(output)),
        })
    chosen_texts = [conv.messages[-1]["content"] for conv in conversations]
    metrics = {
        "n": len(rows),
        "mean_chars": statistics.fmean(r["chars"] for r in rows),
        "mean_words": statistics.fmean(r["words"] for r in rows),
        "empty_rate": statistics.fmean(r["chars"] == 0 for r in rows),
        "mean_rouge1_chosen": statistics.fmean(r["rouge1_chosen"] for r in rows),
        "mean_rouge1_rejected": statistics.fmean(r["rouge1_rejected"] for r in rows),
        "closer_to_chosen_rate": statistics.fmean(r["closer_to_chosen"] for r in rows),
        "mentions_help_rate": statistics.fmean(r["mentions_help"] for r in rows),
        "chosen_mean_chars": statistics.fmean(len(t) for t in chosen_texts),
        "chosen_mentions_help_rate": statistics.fmean(bool(_HELP.search(t)) for t in chosen_texts),
    }
    plots = {
        "rouge_scatter": {"kind": "scatter", "x": [r["rouge1_chosen"] for r in rows],
                          "y": [r["rouge1_rejected"] for r in rows], "xlabel": "ROUGE-1 F1 to the chosen answer",
                          "ylabel": "ROUGE-1 F1 to the rejected answer", "limits": [0, 1],
                          "title": "Generated answers: below the line = closer to the chosen answer"},
        "indicators": {"kind": "bar", "labels": ["closer_to_chosen", "mentions_help", "empty"],
                       "values": [metrics["closer_to_chosen_rate"], metrics["mentions_help_rate"],
                                  metrics["empty_rate"]],
                       "ylabel": "share of answers", "title": "Answer indicators"},
    }
    return {"metrics": metrics, "rows": rows, "plots": plots}


DPO = Task("preference", build_datasets, prepare_training=prepare_training, score_outputs=score_outputs,
           activation_factor=2.0)
SFT = Task("preference_sft", build_datasets, score_outputs=score_outputs)
