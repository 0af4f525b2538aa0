"""Guided rubric decoding and the decoder under it, on tiny random models.

The decoder's masks are checked against plain unbatched forward passes: a score read from a tree of branches,
rows fed different numbers of tokens (holes) and greedy continuations after them give what each row gives alone.
"""

import contextlib
import warnings

import pytest
import torch

from gemma_lowmem.evaluation.generate import Decoder, generate_ids
from gemma_lowmem.evaluation.guided import Decoding, read_score, rubric_answers
from gemma_lowmem.tasks.essay_rubric import ESSAY_RUBRIC
from gemma_lowmem.tasks.summary_rubric import SUMMARY_RUBRIC
from tests.tiny import tiny_gemma3, tiny_gemma3n, tiny_tokenizer

DIGITS = list(range(10, 20))  # token ids standing for the digits 0-9 in the tiny vocabulary
END = 20
MODELS = pytest.mark.parametrize("factory", [tiny_gemma3, tiny_gemma3n], ids=["gemma3", "gemma3n"])


def _alone_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), V) log-probabilities of the next token after each position of one unpadded row."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)


def _rows():
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(30, 1000, (n,), generator=g).tolist() for n in (11, 4, 7)]
    fed = [torch.randint(30, 1000, (n,), generator=g).tolist() for n in (0, 5, 2)]  # ragged: holes in the cache
    return prompts, fed


@MODELS
@pytest.mark.parametrize("maximum", [7, 30, 100])
def test_score_tree_matches_teacher_forcing(factory, maximum):
    model = factory()
    prompts, fed = _rows()
    decoder = Decoder(model, prompts, pad_id=0)
    decoder.feed(fed)
    readings, logp = read_score(decoder, maximum, DIGITS, END)
    for r, (prompt, extra) in enumerate(zip(prompts, fed)):
        for s in {0, 1, 7, maximum // 2, maximum} - {x for x in range(maximum + 1, 101)}:
            ids = prompt + extra + [DIGITS[int(d)] for d in str(s)] + [END]
            alone = _alone_logprobs(model, ids)
            start = len(prompt) + len(extra)
            expected = sum(alone[k - 1, ids[k]] for k in range(start, len(ids)))
            torch.testing.assert_close(logp[r, s], expected, atol=2e-4, rtol=1e-4)
        probs = torch.softmax(logp[r], 0)
        assert readings[r].value == int(logp[r].argmax())
        assert readings[r].expected == pytest.approx(float((probs * torch.arange(maximum + 1)).sum()), rel=1e-5)
        assert 0 < readings[r].mass <= 1


@MODELS
def test_greedy_after_holes_and_a_branch_equals_each_row_alone(factory):
    model = factory()
    prompts, fed = _rows()
    decoder = Decoder(model, prompts, pad_id=0)
    decoder.feed(fed)
    read_score(decoder, 12, DIGITS, END)  # the branch must leave the cache as it was
    stops = [5]
    got = decoder.greedy(stops, 6, active=[True, False, True])
    assert got[1] == []
    for r in (0, 2):
        ids = prompts[r] + fed[r]
        alone = generate_ids(model, [ids], pad_id=0, stop_ids=stops, max_new_tokens=6, show_progress=False)[0]
        assert got[r] == alone


def _prompts(tokenizer, n: int) -> list[str]:
    g = torch.Generator().manual_seed(2)
    words = ["기사", "summary", "요약", "the", "학생", "news", "점수"]
    return ["<bos><start_of_turn>user\n" + " ".join(words[int(i)] for i in torch.randint(0, 7, (k,), generator=g))
            + "<end_of_turn>\n<start_of_turn>model\n" for k in torch.randint(3, 30, (n,), generator=g).tolist()]


@pytest.mark.parametrize(("spec", "lang", "mode"), [
    (SUMMARY_RUBRIC, "ko", "guided"), (SUMMARY_RUBRIC, "en", "guided"), (SUMMARY_RUBRIC, "ko", "scores"),
    (ESSAY_RUBRIC, "en", "guided"), (ESSAY_RUBRIC, "ko", "scores"),
], ids=["summary-ko", "summary-en", "summary-scores", "essay-en", "essay-scores"])
def test_guided_answers_are_always_valid(spec, lang, mode):
    tokenizer = tiny_tokenizer()
    prompts = _prompts(tokenizer, 7)
    decoding = Decoding(mode=mode, slot_tokens={"comment": 6, "feedback": 8, "suggestions": 8}, batch_size=3,
                        show_progress=False)
    answers = rubric_answers(tiny_gemma3(seed=3), tokenizer, prompts, spec=spec, lang=lang, decoding=decoding)
    assert len(answers) == len(prompts)
    for answer in answers:
        result = answer.result
        assert result.valid, result.problems
        assert set(answer.readings) == set(spec.criteria)
        for key, (maximum, _, _) in spec.criteria.items():
            reading = answer.readings[key]
            assert result.scores[key] == reading.value and 0 <= reading.expected <= maximum
        assert result.total == sum(result.scores.values())
        assert answer.expected_total == pytest.approx(sum(answer.readings[k].expected for k in spec.criteria))
        assert answer.text.startswith(spec.titles[lang])
        if mode == "scores":
            assert result.feedback is None and all(c is None for c in result.comments.values())


def test_free_mode_parses_plain_generation():
    tokenizer = tiny_tokenizer()
    answers = rubric_answers(tiny_gemma3(), tokenizer, _prompts(tokenizer, 2), spec=SUMMARY_RUBRIC, lang="ko",
                             decoding=Decoding(mode="free", max_new_tokens=5, show_progress=False))
    assert len(answers) == 2 and all(not a.result.valid and a.readings == {} for a in answers)


def test_every_forward_runs_under_the_autocast_given_and_no_deprecation_warning():
    model, tokenizer = tiny_gemma3(), tiny_tokenizer()
    entered, forwards = [], []
    model.register_forward_hook(lambda *_: forwards.append(1))

    @contextlib.contextmanager
    def autocast():
        entered.append(1)
        yield

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        decoding = Decoding(slot_tokens={"comment": 2, "feedback": 2, "suggestions": 2}, show_progress=False,
                            autocast=autocast)
        rubric_answers(model, tokenizer, _prompts(tokenizer, 2), spec=SUMMARY_RUBRIC, lang="ko", decoding=decoding)
    assert forwards and len(entered) == len(forwards)


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be one of"):
        Decoding(mode="beam")


@pytest.mark.parametrize("field", ["max_new_tokens", "batch_size"])
def test_decoding_refuses_a_cap_or_batch_below_one(field):
    with pytest.raises(ValueError, match=f"Decoding.{field}=0 must be > 0"):
        Decoding(**{field: 0})


def test_decoding_from_a_run_config_reads_eval_model_and_max_mem():
    from gemma_lowmem.config import EvalConfig, ModelConfig, RunConfig, TrainConfig

    cfg = RunConfig(model=ModelConfig(system_role=True), train=TrainConfig(max_mem="3GB"),
                    eval=EvalConfig(mode="scores", max_new_tokens=50, gen_batch_size=3))
    decoding = Decoding.from_config(cfg, contextlib.nullcontext, show_progress=False)
    assert decoding == Decoding(mode="scores", max_new_tokens=50, batch_size=3, system_role=True,
                                autocast=contextlib.nullcontext, memory_budget=3 * 10**9, show_progress=False)
    with pytest.raises(AttributeError):
        decoding.mode = "free"  # type: ignore[misc]  # one frozen value
