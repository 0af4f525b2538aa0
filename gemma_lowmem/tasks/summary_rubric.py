"""Task 1's summary rubric (coverage 40, accuracy 30, conciseness 20, grammar 10) as data.

:data:`SUMMARY_RUBRIC` is a :class:`~gemma_lowmem.evaluation.rubric.RubricSpec`: the summary task
(:mod:`gemma_lowmem.tasks.summary_eval`) writes its targets, prompts and metrics from it, and guided decoding, the
renderer and the parser take it as they take any rubric. :data:`CRITERIA_HELP` is what the system prompt says each
criterion asks. To change the rubric, change it here; a teacher's own rubric (other maxima or labels, some of these
criteria) is a spec given to :func:`~gemma_lowmem.tasks.summary_eval.summary_task`.
"""

from __future__ import annotations

from gemma_lowmem.evaluation.rubric import RubricSpec

SUMMARY_RUBRIC = RubricSpec(
    criteria={
        "coverage": (40, "핵심 내용 포함도", "Content coverage"),
        "accuracy": (30, "정확성", "Accuracy"),
        "conciseness": (20, "간결성", "Conciseness"),
        "grammar": (10, "문법 및 표현", "Grammar and expression"),
    },
    titles={"ko": "요약 평가 결과:", "en": "Summary evaluation:"},
    aliases={
        "coverage": (
            r"핵심\s*내용\s*(?:의\s*)?포함\s*(?:도|정도|여부)?", r"핵심\s*내용", r"내용\s*포함\s*도?", r"포함도",
            r"내용\s*(?:충실도|완전성|완결성)", r"완전성",
            r"(?:content|key\s+content|main\s+(?:ideas?|points?)|key\s+(?:points?|information|ideas?))"
            r"(?:\s+coverage)?",
            r"coverage", r"completeness",
        ),
        "accuracy": (r"(?:사실\s*|내용\s*)?정확\s*(?:성|도)", r"(?:factual\s+)?accuracy", r"correctness",
                     r"faithfulness", r"factuality"),
        "conciseness": (r"간결\s*(?:성|함|도)?", r"conciseness", r"concision", r"brevity", r"succinctness"),
        "grammar": (
            r"문법\s*(?:및|과|와|/|·|&|,|그리고)?\s*표현\s*력?", r"문법\s*성?", r"표현\s*력?",
            r"grammar\s*(?:and|&|/|,)?\s*(?:expression|style|language|usage|fluency|mechanics)", r"grammar",
            r"expression", r"language(?:\s+(?:use|quality))?", r"fluency", r"writing\s+quality",
        ),
        "title": (r"요약\s*평가(?:\s*결과)?", r"summary\s+evaluation(?:\s+results?)?"),
    },
)
"""Task 1's summary rubric (100 points)."""

CRITERIA_HELP = {  # what each criterion asks: (English, Korean)
    "coverage": ("does it include all key points of the article?", "기사의 핵심 내용을 빠짐없이 담았는가"),
    "accuracy": ("are there no facts that differ from or are missing in the article?",
                 "기사와 다른 사실이나 기사에 없는 내용이 없는가"),
    "conciseness": ("is it 3-4 sentences long, without unnecessary content?",
                    "불필요한 내용 없이 요청한 3-4문장 길이로 썼는가"),
    "grammar": ("are grammar, spelling and word order correct and the wording natural?",
                "문법, 맞춤법, 어순이 바르고 표현이 자연스러운가"),
}
