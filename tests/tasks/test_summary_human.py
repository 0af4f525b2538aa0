"""Task 1 against human judgments (``tasks/summary_human.py``); the end-to-end runs of the script are in
``tests/test_evaluate.py``."""

from gemma_lowmem.evaluation.human import Judgment
from gemma_lowmem.tasks.summary_human import limit_documents


def test_limit_documents_keeps_whole_documents():
    judgments = [Judgment(doc, f"s{i}", "a", "s", "r", {}, "") for i, doc in enumerate("aaabbbcc")]
    assert [j.doc_id for j in limit_documents(judgments, 7)] == list("aaabbb")
    assert [j.doc_id for j in limit_documents(judgments, 2)] == list("aaa")  # at least one document
    assert len(limit_documents(judgments, None)) == 8
