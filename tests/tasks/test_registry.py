"""The task registry: every built-in task is a value of its own, and a task from outside the package registers,
trains through the run and is evaluated by generation like a built-in one."""

import json

import pytest

from gemma_lowmem import tasks
from gemma_lowmem.config import DataConfig, EvalConfig, ModelConfig, RunConfig, TrainConfig
from gemma_lowmem.data.conversation import Conversation
from gemma_lowmem.errors import UserError
from gemma_lowmem.run import report_after_training, train_from_config
from gemma_lowmem.tasks import Task, get_task, register_task, task_names
from tests.tiny import tiny_gemma3, tiny_tokenizer


def test_every_builtin_name_is_its_own_task_value():
    built_in = ["summary_eval", "topic", "topic_grade", "essay", "essay_write", "preference", "preference_sft"]
    assert task_names()[: len(built_in)] == built_in
    values = [get_task(name) for name in built_in]
    assert [t.name for t in values] == built_in
    assert len({id(t) for t in values}) == len(built_in)
    assert get_task("summary_eval").rubric.max_total == 100 and get_task("essay").rubric is not None
    assert get_task("topic").rubric is None


def _sums(data: DataConfig, seed: int) -> tuple[list[Conversation], list[Conversation]]:
    conversations = [Conversation([{"role": "user", "content": f"{i} + {seed}?"},
                                   {"role": "assistant", "content": str(i + seed)}], meta={"answer": str(i + seed)})
                     for i in range(12)]
    return conversations[:10], conversations[10:]


def _exact(conversations: list[Conversation], outputs: list[str]) -> dict:
    hits = [o.strip() == c.meta["answer"] for c, o in zip(conversations, outputs)]
    return {"metrics": {"exact": sum(hits) / len(hits)}, "rows": [{"ok": h} for h in hits], "plots": {}}


@pytest.fixture
def sums_task(monkeypatch):
    monkeypatch.setattr(tasks, "_REGISTERED", {})  # this test's registration ends with it
    task = Task("sums", _sums, score_outputs=_exact)
    register_task(task)
    return task


def test_a_registered_task_trains_and_is_evaluated(sums_task, tmp_path):
    assert get_task("sums") is sums_task and task_names()[-1] == "sums"
    with pytest.raises(ValueError, match="already registered"):
        register_task(Task("summary_eval", _sums))
    with pytest.raises(UserError, match="available: .*sums"):
        get_task("nope")
    model_dir = tmp_path / "tiny"
    tiny_gemma3().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    cfg = RunConfig(model=ModelConfig(model=str(model_dir), quant="none"),
                    data=DataConfig(task="sums", max_seq_length=64, cache_dir=str(tmp_path / "cache")),
                    train=TrainConfig(output_dir=str(tmp_path / "run"), max_steps=2, batch_size=2, grad_accum=1,
                                      eval_every=0, save_every=0, max_mem="4GB", precision="fp32"),
                    eval=EvalConfig(max_new_tokens=3, gen_batch_size=2))
    prepared, result = train_from_config(cfg)
    assert result.steps == 2 and len(prepared.val_conversations) == 2
    report = json.loads(report_after_training(cfg, prepared).with_suffix(".json").read_text(encoding="utf-8"))
    assert set(report["systems"]) == {"base", "adapter"}
    assert all("exact" in system["metrics"] for system in report["systems"].values())
