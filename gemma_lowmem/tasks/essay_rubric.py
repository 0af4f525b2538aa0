"""The essay rubric (claim 25, evidence 25, counter-arguments 15, organisation 20, expression 15) as data.

:data:`ESSAY_RUBRIC` is a :class:`~gemma_lowmem.evaluation.rubric.RubricSpec`: pass it to
:func:`~gemma_lowmem.evaluation.rubric.render_rubric` and :func:`~gemma_lowmem.evaluation.rubric_parse.parse_rubric`,
which write the answer laid out like task 1's (title, bold total, one line per criterion with a comment, overall
feedback, suggestions) and read it back with every form that parser accepts. :data:`CRITERIA_HELP` is what the
system prompt says each criterion asks.
"""

from __future__ import annotations

from gemma_lowmem.evaluation.rubric import RubricSpec

ESSAY_RUBRIC = RubricSpec(
    criteria={
        "claim": (25, "주장의 명확성", "Clarity of claim"),
        "evidence": (25, "근거의 타당성", "Evidence and reasoning"),
        "counter": (15, "반론 고려", "Counter-arguments"),
        "organization": (20, "구성", "Organisation"),
        "expression": (15, "표현", "Expression"),
    },
    titles={"ko": "에세이 평가 결과:", "en": "Essay evaluation:"},
    aliases={
        "claim": (r"주장\s*의?\s*(?:명확|명료|분명)\s*(?:성|함|도)?", r"논지\s*(?:의\s*)?(?:명확\s*성)?", r"주장",
                  r"(?:clarity\s+of\s+(?:the\s+)?)?(?:claim|position|thesis)(?:\s+clarity)?"),
        "evidence": (r"근거\s*(?:의\s*)?(?:타당\s*성|적절\s*성|충분\s*성)?", r"논거",
                     r"evidence(?:\s+(?:and|&)\s+reasoning)?", r"support(?:ing\s+evidence)?", r"reasoning"),
        "counter": (r"반론\s*(?:의\s*)?(?:고려|검토|반박|처리)?", r"반대\s*(?:의견|입장)\s*(?:고려)?",
                    r"counter(?:[\s-]*(?:arguments?|claims?))?", r"opposing\s+views?", r"rebuttal"),
        "organization": (r"(?:글\s*의\s*)?구성\s*(?:력)?", r"조직\s*성?", r"구조", r"organi[sz]ation", r"structure",
                         r"coherence"),
        "expression": (r"(?:문장\s*)?표현\s*력?", r"(?:문법|어법)\s*(?:및|과|와|/)?\s*(?:표현)?", r"expression",
                       r"language(?:\s+use)?", r"style", r"grammar(?:\s+(?:and|&)\s+expression)?", r"conventions",
                       r"mechanics"),
        "title": (r"(?:에세이|글)\s*평가(?:\s*결과)?", r"essay\s+evaluation(?:\s+results?)?"),
    },
)
"""Task 3's essay rubric (100 points)."""

ESSAY_CRITERIA = ESSAY_RUBRIC.criteria
"""Criterion key -> (maximum, Korean label, English label), in the order the answer lists them."""

MAX_TOTAL = ESSAY_RUBRIC.max_total

CRITERIA_HELP = {  # what each criterion asks: (English, Korean)
    "claim": ("is the writer's position stated clearly and kept throughout?",
              "글의 주장(입장)이 분명하고 끝까지 유지되는가"),
    "evidence": ("are the reasons and examples relevant, specific and sufficient?",
                 "주장을 뒷받침하는 근거와 예시가 타당하고 구체적이며 충분한가"),
    "counter": ("does it take up an opposing view and answer it?", "반대 의견을 다루고 그에 대해 반박하는가"),
    "organization": ("is it organised into introduction, body and conclusion, with paragraphs and transitions?",
                     "서론-본론-결론의 구성과 문단 나누기, 연결이 논리적인가"),
    "expression": ("are the sentences clear, and the word choice, spelling and grammar accurate?",
                   "문장이 명확하고 어휘, 맞춤법, 문법이 정확한가"),
}
