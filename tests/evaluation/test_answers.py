"""Evaluation by generation (``evaluation/answers.py``): answers scored by a task's function, guided rubric answers,
base vs adapter through the disabled adapter, prompt excerpts."""

import pytest
import torch

from gemma_lowmem.config import EvalConfig, LoraConfig
from gemma_lowmem.data.conversation import Conversation
from gemma_lowmem.errors import UserError
from gemma_lowmem.evaluation.answers import answer_and_score, compare_systems, prompt_excerpt
from gemma_lowmem.evaluation.generate import generate_texts
from gemma_lowmem.evaluation.guided import Decoding
from gemma_lowmem.evaluation.rubric_parse import parse_rubric
from gemma_lowmem.model import add_lora
from gemma_lowmem.tasks import get_task, summary_eval
from gemma_lowmem.tasks.summary_rubric import SUMMARY_RUBRIC
from tests.tiny import news_record, tiny_gemma3, tiny_tokenizer

CRITERIA = SUMMARY_RUBRIC.criteria


@pytest.fixture(scope="module")
def conversations() -> list[Conversation]:
    return summary_eval.build_conversations([news_record(i) for i in range(8)], "en", seed=0)  # all 8 kinds


def _count_outputs(conversations, outputs):
    return {"metrics": {"n": len(outputs)}, "rows": [{"ok": False} for _ in outputs], "plots": {}}


def _short_conversations(n: int) -> list[Conversation]:
    return [Conversation([{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {i}."},
                          {"role": "assistant", "content": f"{i}"}]) for i in range(n)]


def test_answer_and_score_on_task_one(conversations):
    task = get_task("summary_eval")
    decoding = Decoding(mode="free", max_new_tokens=6, batch_size=2, show_progress=False)
    result = answer_and_score(tiny_gemma3(), tiny_tokenizer(), conversations[:3], task.score_outputs, decoding,
                              rubric=task.rubric, examples=2)
    assert result["n"] == 3 and len(result["outputs"]) == 3 and result["metrics"]["valid_rate"] == 0.0
    assert [e["index"] for e in result["examples"]] == [0, 1]
    example = result["examples"][0]
    assert example["target_text"] == conversations[0].messages[-1]["content"]
    assert example["prompt_excerpt"].rstrip().endswith("<start_of_turn>model")  # the generation prompt
    generation = result["metrics"]["generation"]
    assert generation["prompts"] == 3 and generation["seconds"] > 0 and generation["prompt_tokens_max"] > 100


@pytest.mark.parametrize("mode", ["guided", "scores"])
def test_answer_and_score_guided_is_always_valid(conversations, mode, monkeypatch):
    monkeypatch.setattr("gemma_lowmem.evaluation.guided.SLOT_TOKENS", {"comment": 3, "feedback": 4, "suggestions": 4})
    task = get_task("summary_eval")
    decoding = Decoding(mode=mode, max_new_tokens=6, batch_size=2, show_progress=False)
    result = answer_and_score(tiny_gemma3(), tiny_tokenizer(), conversations[:3], task.score_outputs, decoding,
                              rubric=task.rubric, examples=2)
    metrics = result["metrics"]
    assert EvalConfig().mode == "guided"  # the default of every rubric task
    assert metrics["valid_rate"] == 1.0 and metrics["generation"]["mode"] == mode
    assert metrics["agreement"]["total"]["n_valid"] == 3
    expected = metrics["expected_agreement"]
    assert set(expected) == {"total", *CRITERIA} and expected["total"]["n_valid"] == 3
    assert all(parse_rubric(o, SUMMARY_RUBRIC).valid for o in result["outputs"])


def test_compare_evaluates_base_through_disabled_adapter():
    torch.manual_seed(1)
    adapted = add_lora(tiny_gemma3(), LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]),
                       gradient_checkpointing=True)  # as the training run leaves it
    for name, param in adapted.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=2.0)  # LoRA starts as a no-op; make it change the answers
    tokenizer, convs = tiny_tokenizer(), _short_conversations(3)
    systems = compare_systems(adapted, True, lambda m: answer_and_score(
        m, tokenizer, convs, _count_outputs, Decoding(max_new_tokens=6, batch_size=2, show_progress=False)))
    assert list(systems) == ["base", "adapter"]
    prompts = [e["prompt_excerpt"] for e in systems["base"]["examples"]]
    plain = generate_texts(tiny_gemma3(), tokenizer, prompts, max_new_tokens=6, show_progress=False)
    assert systems["base"]["outputs"] == plain
    assert systems["adapter"]["outputs"] != plain
    with pytest.raises(UserError, match="--adapter"):
        compare_systems(tiny_gemma3(), True, lambda m: {})


def test_prompt_excerpt_keeps_start_and_end():
    prompt = "S" * 400 + "M" * 2000 + "E" * 1000
    excerpt = prompt_excerpt(prompt)
    assert excerpt.startswith("S" * 300) and excerpt.endswith("E" * 900) and "2,200 characters" in excerpt
    assert prompt_excerpt("short") == "short"
