"""What every SFT task hands to the loop: a conversation whose last assistant turn is the target."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass
class Conversation:
    """One training example in chat form.

    Attributes:
        messages: the turns; the last one is the assistant answer that carries the loss.
        cut: a span of the messages' text (the article, say) that may be shortened at a sentence end when the
            tokenized conversation exceeds ``max_seq_length``; the answer is never cut.
        meta: task facts kept for statistics and evaluation (summary type, target scores, ...).
        answer_weights: ``(start, end, weight)`` character spans of the answer (the last turn's content) whose
            tokens count ``weight`` times in the loss (the rest once), e.g. a rubric's scores.
    """

    messages: list[Message]
    cut: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    answer_weights: list[tuple[int, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        assert self.messages and self.messages[-1]["role"] == "assistant", "the last turn must be the answer"
