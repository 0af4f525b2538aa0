"""ROUGE-1/2/L/Lsum for English and Korean summaries, on top of the ``rouge-score`` package.

On English text the numbers are exactly those of ``rouge_score.rouge_scorer.RougeScorer(types, use_stemmer=True)``.
That package's tokenizer deletes every character outside ``[a-z0-9]``, so Korean text would score 0; a pair that
holds a letter of a non-Latin script (Hangul, CJK, Cyrillic, ...) is therefore tokenized by :class:`UnicodeTokenizer`
instead: NFKC, lowercase, split on anything that is not a letter, mark or digit, Porter-stem only ASCII words.
Korean words keep their particles (``연구진은`` and ``연구진이`` differ), as in word-level ROUGE on any Korean
tokenizer without morphological analysis; scripts written without spaces (Chinese, Japanese) become one token per
run of letters, so word-level ROUGE means little there.

ROUGE-Lsum treats each line as a sentence (the CNN/DailyMail highlights form).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from nltk.stem import porter
from rouge_score import rouge_scorer

from gemma_lowmem.text import has_non_latin_letter

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
LANGS = ("en", "ko")

_ASCII_WORD_RE = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class RougeScore:
    """ROUGE of one prediction against one reference, each in [0, 1]."""

    precision: float
    recall: float
    fmeasure: float


class UnicodeTokenizer:
    """Word tokenizer that keeps every script; plugs into ``RougeScorer(tokenizer=...)``.

    ASCII words longer than 3 characters are Porter-stemmed as rouge-score does, so English words inside Korean
    text match the way they would in English text.
    """

    def __init__(self) -> None:
        self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        """Split ``text`` into lowercase words.

        Args:
            text: any text.

        Returns:
            The words, in order; punctuation, symbols and spaces are dropped.
        """
        text = unicodedata.normalize("NFKC", text).lower()
        words: list[str] = []
        current: list[str] = []
        for ch in text:
            # Marks (category M) belong to their word: Devanagari or Thai vowel signs are not isalnum().
            if ch.isalnum() or unicodedata.category(ch)[0] == "M":
                current.append(ch)
            elif current:
                words.append("".join(current))
                current = []
        if current:
            words.append("".join(current))
        return [self._stemmer.stem(w) if len(w) > 3 and _ASCII_WORD_RE.fullmatch(w) else w for w in words]


@functools.cache
def _scorer(lang: str) -> rouge_scorer.RougeScorer:
    if lang == "en":
        return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=UnicodeTokenizer())


def _pair_lang(prediction: str, reference: str, lang: str | None) -> str:
    if lang is None:
        # One tokenizer for both sides, so an English answer to a Korean reference is still compared word by word.
        return "ko" if has_non_latin_letter(prediction) or has_non_latin_letter(reference) else "en"
    if lang not in LANGS:
        raise ValueError(f"lang must be one of {LANGS} or None (auto), got {lang!r}")
    return lang


def rouge_pair(prediction: str, reference: str, lang: str | None = None) -> dict[str, RougeScore]:
    """ROUGE of one prediction against one reference.

    Args:
        prediction: the generated summary.
        reference: the reference summary; for ROUGE-Lsum, one sentence per line.
        lang: ``"en"`` (rouge-score's tokenizer), ``"ko"`` (:class:`UnicodeTokenizer`, for Korean and other
            scripts) or ``None``: ``"ko"`` when either text holds a letter of a non-Latin script.

    Returns:
        ``{"rouge1", "rouge2", "rougeL", "rougeLsum"} -> RougeScore``; empty texts score 0.
    """
    for name, value in (("prediction", prediction), ("reference", reference)):
        if not isinstance(value, str):
            raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    scores = _scorer(_pair_lang(prediction, reference, lang)).score(reference, prediction)
    return {k: RougeScore(float(s.precision), float(s.recall), float(s.fmeasure)) for k, s in scores.items()}


def rouge_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    lang: str | None = None,
    bootstrap: bool = False,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """Corpus ROUGE: the mean over pairs of each pair's F1 (and precision, recall).

    Args:
        predictions: generated summaries.
        references: reference summaries, same length; for ROUGE-Lsum, one sentence per line.
        lang: ``"en"``, ``"ko"`` or ``None`` to choose per pair (see :func:`rouge_pair`).
        bootstrap: also give a 95% percentile interval of each mean F1 from resampling the pairs.
        n_resamples: bootstrap resamples.
        seed: seed of the bootstrap's generator.

    Returns:
        ``rouge1``, ``rouge2``, ``rougeL``, ``rougeLsum``: mean F1 in [0, 1]; ``<type>_precision`` and
        ``<type>_recall``: mean precision and recall; with ``bootstrap``, ``<type>_low`` and ``<type>_high``.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references; they must pair up")
    if not predictions:
        raise ValueError("no pairs to score: predictions and references are empty")
    if bootstrap and n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    per_pair = [rouge_pair(p, r, lang) for p, r in zip(predictions, references)]
    # (N, types, 3): precision, recall, F1 of each pair
    table = np.array([[[s[k].precision, s[k].recall, s[k].fmeasure] for k in ROUGE_TYPES] for s in per_pair])
    out: dict[str, float] = {}
    for t, key in enumerate(ROUGE_TYPES):
        out[key] = float(table[:, t, 2].mean())
        out[f"{key}_precision"] = float(table[:, t, 0].mean())
        out[f"{key}_recall"] = float(table[:, t, 1].mean())
    if bootstrap:
        n = len(per_pair)
        idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))  # (R, N) pair indices
        for t, key in enumerate(ROUGE_TYPES):
            means = table[:, t, 2][idx].mean(axis=1)  # (R,)
            low, high = np.percentile(means, [2.5, 97.5])
            out[f"{key}_low"] = float(low)
            out[f"{key}_high"] = float(high)
    return out
