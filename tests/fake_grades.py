"""A made-up article and grades for the grading page's and the .xlsx tests: file round trips without a model."""

from __future__ import annotations

from gemma_lowmem.grading import Grade
from gemma_lowmem.tasks.summary_rubric import SUMMARY_RUBRIC

ARTICLE = "The city opened a new library on Monday. It has 20,000 books. The mayor spoke at the opening."
SLOTS = {"comment": 3, "feedback": 3, "suggestions": 3}  # short guided slots: a tiny model grades in a second


def fake_grades(rows):
    """A grade of 50 for each row (every criterion 1, expected 1.25)."""
    keys = SUMMARY_RUBRIC.criteria
    return [Grade(id=r["id"], valid=True, total=50, expected_total=50.5, scores=dict.fromkeys(keys, 1),
                  expected=dict.fromkeys(keys, 1.25), comments=dict.fromkeys(keys), feedback="ok",
                  suggestions="- more", answer="text", mode="guided") for r in rows]
