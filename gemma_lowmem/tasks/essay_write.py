"""Task 3b, critical writing (``--task essay_write``): a news article and a question -> an argumentative essay.

Each conversation: (system) the writing teacher's instructions; (user) the article, a question about it and the
request for an argumentative essay; (assistant) a model essay, the only turn with loss. ``cut`` is the article.

Questions come from four templates over the article, quoting its first sentence: ``agree`` (is this a good thing?),
``causes`` (why did it happen?), ``consequences`` (what will follow?), ``action`` (what should be done?); each block
of four rows holds all four in a seeded order.

News data sets hold no essays about their articles, so the **training targets are template-built** in the form of
the demo essays: a claim for the question's kind; two reasons, each quoting one of the article's sentences (the two
that carry the most content words and numbers, in article order, the first sentence excluded since the question
quotes it); a counter-argument quoting a third sentence (one with a contrast word such as "but", "critics", "하지만"
when there is one, else a seeded pick) and its rebuttal; and a conclusion. They teach the form (claim, cited
evidence, counter-argument, conclusion) and grounding in the article, not original thought.

Generated essays are measured by :func:`score_outputs`: length, grounding in the article (ROUGE-1 recall and
precision of the essay against the article, and the share of the essay's sentences whose content words come mostly
from the article), the argument markers found (claim, evidence, counter-argument, conclusion; see
:mod:`gemma_lowmem.tasks.essay_feedback`), and, when a trained essay scorer's answers are given, its mean total.

Data: articles from the hub set ``abisee/cnn_dailymail`` (3.0.0: train / validation), a local JSONL/CSV/Parquet file
with ``article`` (or ``text``), or the summary task's bundled demo articles.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections import Counter
from typing import Any

from gemma_lowmem.config import DataConfig
from gemma_lowmem.data.conversation import Conversation, Message
from gemma_lowmem.evaluation.rouge import rouge_pair
from gemma_lowmem.evaluation.rubric_parse import parse_rubric
from gemma_lowmem.tasks import Task
from gemma_lowmem.tasks.essay_feedback import essay_features
from gemma_lowmem.tasks.essay_rubric import ESSAY_RUBRIC
from gemma_lowmem.tasks.sources import BadRow, HubSet, LoadedRows, MissingField, Row, load_rows
from gemma_lowmem.tasks.summary_eval import DEMO_FILE
from gemma_lowmem.text import content_tokens, cut_at_sentence_end, split_sentences

log = logging.getLogger(__name__)

KINDS = ("agree", "causes", "consequences", "action")
HUB = HubSet("abisee/cnn_dailymail", "3.0.0", "train", "validation")
FIELDS = ("id", "article", "text")  # what --columns may map
GROUNDED_SHARE = 0.6  # a sentence is grounded when this share of its content words occurs in the article

# ------------------------------------------------------------------------------------------------------ loading


def load_data(cfg: DataConfig) -> LoadedRows:
    """Training and validation articles ``{"id", "article"}``, the article cut to ``max_article_length``.

    Args:
        cfg: the data configuration.

    Returns:
        The rows and what was skipped.
    """
    def normalise(row: Row) -> Row:
        if not isinstance(row, dict):
            raise BadRow(f"expected an object with fields, got {type(row).__name__}")
        article = next((row[k] for k in ("article", "text") if isinstance(row.get(k), str) and row[k].strip()), None)
        if article is None:
            raise MissingField("article", f"missing field 'article' (or 'text') (fields present: "
                                          f"{', '.join(row) or 'none'})")
        article = cut_at_sentence_end(" ".join(article.split()), cfg.max_article_length)
        row_id = row.get("id")
        if row_id in (None, ""):
            row_id = "article-" + hashlib.sha1(article.encode("utf-8")).hexdigest()[:10]
        return {"id": str(row_id), "article": article}

    data = load_rows(cfg, normalise, fields=FIELDS, demo_file=DEMO_FILE, hub=HUB)
    log.info("%s: %d training articles, %d validation articles", data.source, len(data.train), len(data.val))
    return data


# ------------------------------------------------------------------------------------------------------ prompts

_QUESTIONS = {  # (English, Korean); {lead} is the article's first sentence
    "agree": (
        'The article reports: "{lead}" Do you think what it describes is a good thing? State whether you agree or '
        "disagree.",
        '기사는 "{lead}"라고 전합니다. 기사에서 다룬 일이 바람직하다고 생각하나요? 동의하는지 아닌지 입장을 '
        "정하세요.",
    ),
    "causes": (
        'The article reports: "{lead}" Why do you think this happened? Argue for the most important cause.',
        '기사는 "{lead}"라고 전합니다. 이 일은 왜 일어났다고 생각하나요? 가장 중요한 원인을 주장하세요.',
    ),
    "consequences": (
        'The article reports: "{lead}" What consequences will this have? Argue for the most likely one.',
        '기사는 "{lead}"라고 전합니다. 이 일은 앞으로 어떤 결과를 가져올까요? 가장 가능성 높은 결과를 '
        "주장하세요.",
    ),
    "action": (
        'The article reports: "{lead}" What should be done about it, and by whom?',
        '기사는 "{lead}"라고 전합니다. 이 일과 관련해 누가 무엇을 해야 한다고 생각하나요?',
    ),
}
_ESSAY = {  # kind -> (claim, first link, second link, conclusion), each (English, Korean)
    "agree": (
        ("I agree that what this article reports is an important issue that deserves attention.",
         "나는 이 기사가 전하는 일이 가볍게 넘길 수 없는 중요한 문제라는 데 동의한다."),
        ("This shows that the issue matters directly to many people's lives.",
         "이 사실은 이 일이 많은 사람의 삶과 직접 관련된 문제임을 보여 준다."),
        ("This, too, supports the direction the article describes.",
         "이 점도 기사가 전하는 방향이 옳다는 것을 뒷받침한다."),
        ("In conclusion, I agree that this is an important issue, and it deserves our continued attention.",
         "따라서 나는 이 기사가 다룬 일이 중요한 문제이며, 우리가 관심을 갖고 지켜봐야 한다고 생각한다."),
    ),
    "causes": (
        ("I think this happened not for one reason but because several causes came together.",
         "나는 이 일이 한 가지 이유가 아니라 여러 원인이 겹쳐서 일어났다고 생각한다."),
        ("This shows that the event did not come out of nowhere but grew from conditions already there.",
         "이는 이 일이 갑자기 일어난 것이 아니라 이전부터 쌓인 조건에서 비롯되었음을 보여 준다."),
        ("This points to a second cause at work.",
         "이 사실은 또 다른 원인이 함께 작용했음을 알려 준다."),
        ("In conclusion, several causes came together here, and each must be understood if it is not to happen "
         "again.",
         "따라서 이 일은 여러 원인이 겹쳐 일어났으며, 원인을 하나씩 살펴야 같은 일이 되풀이되지 않을 것이다."),
    ),
    "consequences": (
        ("I believe this will have lasting consequences, not only for the people involved but for the wider "
         "community.",
         "나는 이 일이 관련된 사람들뿐 아니라 지역 사회 전체에 오래 영향을 줄 것이라고 생각한다."),
        ("This shows that the effects will not end soon.",
         "이것은 이 일의 영향이 당장에 그치지 않을 것임을 보여 준다."),
        ("This suggests that more people are likely to feel the consequences.",
         "이 점을 보면 더 많은 사람이 그 결과를 겪게 될 가능성이 크다."),
        ("In conclusion, the consequences will last, so we should prepare for them now.",
         "따라서 이 일의 결과는 오래 이어질 것이므로, 지금부터 그 영향에 대비해야 한다."),
    ),
    "action": (
        ("I believe the people and institutions involved should agree on a clear plan and act on it.",
         "나는 이 일을 계기로 관련 기관과 주민이 함께 분명한 계획을 세우고 실천해야 한다고 생각한다."),
        ("This shows that how it is handled will affect many people.",
         "이는 이 일을 어떻게 다루느냐에 따라 많은 사람이 영향을 받는다는 것을 보여 준다."),
        ("This shows who is in a position to act first.",
         "이 사실은 누가 먼저 나서야 하는지를 알려 준다."),
        ("In conclusion, those involved should agree on a clear plan and act on it together.",
         "따라서 관련 기관과 주민이 분명한 계획을 세우고 함께 실천해야 한다."),
    ),
}
_CONTRAST = re.compile(r"\b(?:but|however|although|critics|opponents|oppose[sd]?|against|concern(?:s|ed)?|"
                       r"warn(?:s|ed)?)\b|하지만|그러나|반면|반대|우려|비판", re.IGNORECASE)
_NUMBER = re.compile(r"\d")


def _lead(article: str, limit: int = 100) -> str:
    """The article's first sentence, cut to ``limit`` characters at a space (with "…")."""
    sentences = split_sentences(article)
    first = re.sub(r"^\([A-Z]{2,}\)\s*(?:--\s*)?", "", sentences[0] if sentences else article)  # "(CNN) -- "
    if len(first) <= limit:
        return first.rstrip(".")
    cut = first.rfind(" ", 0, limit)
    return first[: cut if cut > limit // 2 else limit].rstrip(" ,;:") + "…"


def question(kind: str, article: str, lang: str = "ko") -> str:
    """The question of ``kind`` (one of :data:`KINDS`) about the article, quoting its first sentence."""
    return _QUESTIONS[kind][lang == "ko"].format(lead=_lead(article))


def system_prompt(lang: str = "ko") -> str:
    """The writing teacher's instructions."""
    if lang == "ko":
        return ("당신은 비판적 글쓰기를 가르치는 교사입니다. 기사를 꼼꼼히 읽고, 질문에 대해 기사 내용을 근거로 삼아 "
                "논리적인 주장하는 글을 쓰세요.")
    return ("You are a teacher of critical writing. Read the article closely and answer the question with a "
            "logical argumentative essay that uses the article's content as evidence.")


def writing_prompt(article: str, question_text: str, lang: str = "ko") -> list[Message]:
    """Messages asking for an argumentative essay about ``article``; the answer is left out.

    Args:
        article: the article.
        question_text: the question (e.g. from :func:`question`).
        lang: ``"ko"`` or ``"en"``.

    Returns:
        System and user messages.
    """
    if lang == "ko":
        user = (f"기사:\n{article}\n\n질문: {question_text}\n\n근거를 들어 주장하는 글을 쓰세요. 주장, 기사에 "
                "나온 근거 두 가지, 예상되는 반론과 그에 대한 반박, 결론을 갖추세요.")
    else:
        user = (f"Article:\n{article}\n\nQuestion: {question_text}\n\nWrite an argumentative essay with reasons. "
                "Include a claim, two reasons taken from the article, a likely counter-argument and your rebuttal, "
                "and a conclusion.")
    return [{"role": "system", "content": system_prompt(lang)}, {"role": "user", "content": user}]


def _weight(sentence: str) -> int:
    return len(set(content_tokens(sentence))) + 2 * len(_NUMBER.findall(sentence))


def model_essay(article: str, kind: str, lang: str, rng: random.Random) -> tuple[str, list[str]]:
    """The template-built target essay (module docstring).

    Args:
        article: the article.
        kind: the question's kind.
        lang: ``"ko"`` or ``"en"``.
        rng: picks the counter-argument's sentence when no sentence holds a contrast word.

    Returns:
        (the essay, paragraphs separated by blank lines; the quoted article sentences, in essay order).
    """
    sentences = [s for s in split_sentences(article) if 25 <= len(s) <= 300]
    pool = sentences[1:] if len(sentences) > 2 else sentences
    contrast = [i for i, s in enumerate(pool) if _CONTRAST.search(s)]
    counter_at = contrast[0] if contrast and len(pool) > 2 else None  # an opposing voice makes the counter-argument
    # Reasons: the weightiest other sentences, contrast sentences last.
    ranked = sorted((i for i in range(len(pool)) if i != counter_at),
                    key=lambda i: (i in contrast, -_weight(pool[i]), i))
    reasons = [pool[i] for i in sorted(ranked[:2])]
    if counter_at is None and len(ranked) > 2:
        counter_at = rng.choice(ranked[2:])
    counter = pool[counter_at] if counter_at is not None else None
    claim, link1, link2, conclusion = (pair[lang == "ko"] for pair in _ESSAY[kind])
    ko = lang == "ko"
    paragraphs = [claim]
    if reasons:
        paragraphs.append(f'첫째, 기사에 따르면 "{reasons[0]}" {link1}' if ko else
                          f'First, according to the article, "{reasons[0]}" {link1}')
    if len(reasons) > 1:
        paragraphs.append(f'둘째, 기사는 "{reasons[1]}"라고 전한다. {link2}' if ko else
                          f'Second, the article states: "{reasons[1]}" {link2}')
    if counter:
        paragraphs.append(f'물론 "{counter}"라는 점을 들어 다르게 생각하는 사람도 있을 것이다. 하지만 이 한 가지 '
                          "사실만으로는 앞의 근거를 뒤집기 어렵다." if ko else
                          f'Of course, some may point out that "{counter}" However, this one fact does not outweigh '
                          "the reasons above.")
    else:
        paragraphs.append("물론 기사 하나만으로는 전체 사정을 알 수 없다는 반론도 있을 것이다. 하지만 기사에 나온 "
                          "사실만으로도 이 주장을 뒷받침하기에 충분하다." if ko else
                          "Of course, some may argue that one article cannot tell the whole story. However, the facts "
                          "it reports are enough to support this view.")
    paragraphs.append(conclusion)
    return "\n\n".join(paragraphs), reasons + ([counter] if counter else [])


# ------------------------------------------------------------------------------------------------ conversations


def assign_kinds(n: int, seed: int) -> list[str]:
    """Question kinds for ``n`` rows: each block of four is a seeded permutation of :data:`KINDS`."""
    kinds: list[str] = []
    for block in range(0, n, len(KINDS)):
        kinds += random.Random(f"{seed}:essay-kinds:{block}").sample(KINDS, len(KINDS))
    return kinds[:n]


def build_conversation(record: Row, kind: str, lang: str, seed: int) -> Conversation:
    """One writing conversation; ``cut`` is the article (metrics read it there); ``meta`` holds the question."""
    article = record["article"]
    rng = random.Random(f"{seed}:{hashlib.sha1(article.encode('utf-8')).hexdigest()}")
    text = question(kind, article, lang)
    essay, quoted = model_essay(article, kind, lang, rng)
    messages = writing_prompt(article, text, lang) + [{"role": "assistant", "content": essay}]
    meta = {"mode": "write", "kind": kind, "id": record.get("id"), "lang": lang, "question": text, "quoted": quoted}
    return Conversation(messages, cut=article, meta=meta)


def build_conversations(records: list[Row], lang: str, seed: int) -> list[Conversation]:
    """Conversations for rows, in order, kinds from :func:`assign_kinds`."""
    return [build_conversation(r, k, lang, seed) for r, k in zip(records, assign_kinds(len(records), seed))]


def build_datasets(cfg: DataConfig, seed: int) -> tuple[list[Conversation], list[Conversation]]:
    """The training script's entry: (train, validation) writing conversations.

    Args:
        cfg: the data configuration.
        seed: the seed for question kinds and counter-argument picks.

    Returns:
        Training and validation conversations.
    """
    data = load_data(cfg)
    return build_conversations(data.train, cfg.lang, seed), build_conversations(data.val, cfg.lang, seed)


def summary_statistics(conversations: list[Conversation]) -> dict[str, Any]:
    """Counts per question kind and the target essays' mean length, for the prepare-data script.

    Args:
        conversations: from :func:`build_datasets`.

    Returns:
        ``{"conversations": n, "kinds": {kind: count}, "target_words_mean": float | None}``.
    """
    kinds = Counter(c.meta["kind"] for c in conversations)
    words = [essay_features(c.messages[-1]["content"])["words"] for c in conversations]
    return {"conversations": len(conversations), "kinds": {k: kinds[k] for k in KINDS if kinds[k]},
            "target_words_mean": _mean([float(w) for w in words])}


# ------------------------------------------------------------------------------------------------------ scoring


def grounding(essay: str, article: str) -> dict[str, float]:
    """How much an essay draws on its article.

    Args:
        essay: the essay.
        article: the article.

    Returns:
        ``rouge1_recall`` (share of the article's words the essay uses), ``rouge1_precision`` (share of the
        essay's words found in the article) and ``grounded_sentences`` (share of the essay's sentences with 3+
        content words of which at least :data:`GROUNDED_SHARE` occur in the article; 0 for an empty essay).
    """
    r1 = rouge_pair(essay, article)["rouge1"]
    have = set(content_tokens(article))
    counted = grounded = 0
    for sentence in split_sentences(essay):
        toks = set(content_tokens(sentence))
        if len(toks) >= 3:
            counted += 1
            grounded += len(toks & have) / len(toks) >= GROUNDED_SHARE
    return {"rouge1_recall": r1.recall, "rouge1_precision": r1.precision,
            "grounded_sentences": grounded / counted if counted else 0.0}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def score_outputs(conversations: list[Conversation], outputs: list[str],
                  scorer_outputs: list[str] | None = None) -> dict[str, Any]:
    """Measure generated essays (module docstring); there is no reference essay to compare with.

    Args:
        conversations: from :func:`build_datasets` (the article is each conversation's ``cut``).
        outputs: the generated essays.
        scorer_outputs: optional answers of a trained essay scorer (``--task essay``) to each generated essay.

    Returns:
        ``metrics``: means of ``words``, ``sentences``, ``paragraphs``, ``rouge1_recall``, ``rouge1_precision``,
        ``grounded_sentences``; ``has_claim``, ``has_evidence``, ``has_counter``, ``has_conclusion`` (share of
        essays with such a marker), ``empty_rate``, ``n``; with ``scorer_outputs``, ``scorer_total_mean`` (over
        answers with a total) and ``scorer_valid_rate``. ``rows``: one per essay. ``plots``: ``length_vs_grounding``
        (words against ROUGE-1 precision).
    """
    if len(conversations) != len(outputs):
        raise ValueError(f"{len(conversations)} conversations but {len(outputs)} outputs; they must pair up")
    if scorer_outputs is not None and len(scorer_outputs) != len(outputs):
        raise ValueError(f"{len(outputs)} essays but {len(scorer_outputs)} scorer answers; they must pair up")
    rows = []
    for i, (conv, out) in enumerate(zip(conversations, outputs)):
        text = out if isinstance(out, str) else ""
        f = essay_features(text)
        row = {"id": conv.meta.get("id"), "kind": conv.meta.get("kind"), "question": conv.meta.get("question"),
               "words": f["words"], "sentences": f["sentences"], "paragraphs": f["paragraphs"] if text.strip() else 0,
               **grounding(text, conv.cut or ""),
               **{f"has_{k}": bool(f["markers"][k]) for k in ("claim", "evidence", "counter", "conclusion")},
               "output": out}
        if scorer_outputs is not None:
            parsed = parse_rubric(scorer_outputs[i], ESSAY_RUBRIC)
            row.update(scorer_total=parsed.total, scorer_valid=parsed.valid)
        rows.append(row)
    keys = ("words", "sentences", "paragraphs", "rouge1_recall", "rouge1_precision", "grounded_sentences",
            "has_claim", "has_evidence", "has_counter", "has_conclusion")
    metrics: dict[str, Any] = {"n": len(rows), **{k: _mean([float(r[k]) for r in rows]) for k in keys},
                               "empty_rate": _mean([float(r["words"] == 0) for r in rows])}
    if scorer_outputs is not None:
        metrics["scorer_total_mean"] = _mean([r["scorer_total"] for r in rows if r["scorer_total"] is not None])
        metrics["scorer_valid_rate"] = _mean([float(r["scorer_valid"]) for r in rows])
    plots = {"length_vs_grounding": {"kind": "scatter", "x": [r["words"] for r in rows],
                                     "y": [r["rouge1_precision"] for r in rows], "xlabel": "essay length (words)",
                                     "ylabel": "ROUGE-1 precision against the article"}}
    return {"metrics": metrics, "rows": rows, "plots": plots}


TASK = Task("essay_write", build_datasets, score_outputs=score_outputs, summary_statistics=summary_statistics)
