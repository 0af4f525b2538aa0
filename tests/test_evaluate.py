"""Evaluation by generation: task-1 scoring of answers, the evaluate script end to end."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from gemma_lowmem.cli import build_parser
from gemma_lowmem.config import DataConfig, EvalConfig, LoraConfig, ModelConfig, RunConfig
from gemma_lowmem.data.conversation import Conversation
from gemma_lowmem.errors import UserError
from gemma_lowmem.evaluation.rouge import rouge_pair
from gemma_lowmem.evaluation.rubric import render_rubric
from gemma_lowmem.evaluation.rubric_parse import parse_rubric
from gemma_lowmem.model import add_lora
from gemma_lowmem.tasks import get_task, sources, summary_eval
from gemma_lowmem.tasks.summary_rubric import SUMMARY_RUBRIC
from tests.tiny import news_record

CRITERIA = SUMMARY_RUBRIC.criteria
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "evaluate.py"
config_for_eval = runpy.run_path(str(SCRIPT))["config_for_eval"]  # the script's merge of run config and flags


@pytest.fixture(scope="module")
def conversations() -> list[Conversation]:
    return summary_eval.build_conversations([news_record(i) for i in range(8)], "en", seed=0)  # all 8 kinds


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "news.jsonl"
    path.write_text("".join(json.dumps(news_record(i)) + "\n" for i in range(20)), encoding="utf-8")  # 2 held out
    return path


# ------------------------------------------------------------------------------------------- score_outputs (task 1)


def test_perfect_outputs_score_perfectly(conversations):
    result = summary_eval.score_outputs(conversations, [c.messages[-1]["content"] for c in conversations])
    metrics = result["metrics"]
    assert metrics["valid_rate"] == 1.0 and metrics["n"] == 8
    for key in ("total", *CRITERIA):
        assert metrics["agreement"][key]["mae"] == 0.0 and metrics["agreement"][key]["n_valid"] == 8
    assert metrics["feedback_rouge"]["rougeL"] == pytest.approx(1.0)
    assert all(v["predicted_mean"] == v["target_mean"] for v in metrics["by_kind"].values())
    assert len(metrics["by_kind"]) == 8
    assert all(row["ok"] and row["abs_error"] == 0 and row["predicted"] == row["target"] for row in result["rows"])
    scatter = result["plots"]["scatter_total"]
    assert scatter["kind"] == "scatter" and scatter["x"] == scatter["y"] == [c.meta["scores"]["total"]
                                                                            for c in conversations]


def test_garbage_outputs_are_invalid(conversations):
    result = summary_eval.score_outputs(conversations, ["�� garbage", ""] * 4)
    metrics = result["metrics"]
    assert metrics["valid_rate"] == 0.0
    assert metrics["agreement"]["total"]["mae"] is None and metrics["agreement"]["total"]["n_valid"] == 0
    assert metrics["feedback_rouge"]["rouge1"] == 0.0
    assert not any(row["ok"] for row in result["rows"]) and result["rows"][0]["predicted"].startswith("invalid")
    assert result["plots"]["scatter_total"]["x"] == []
    json.dumps(result)  # serialisable as is


def test_off_by_some_points(conversations):
    # Two answers re-rendered with coverage lowered by 5 (total too), the rest garbage.
    outputs = ["nothing"] * len(conversations)
    for i in (0, 1):
        target = parse_rubric(conversations[i].messages[-1]["content"], SUMMARY_RUBRIC)
        scores = {k: int(v) for k, v in target.scores.items()}
        scores["coverage"] = max(0, scores["coverage"] - 5)
        outputs[i] = render_rubric(scores, target.feedback, target.suggestions, target.comments, "en", SUMMARY_RUBRIC)
    drops = [conversations[i].meta["scores"]["coverage"] - max(0, conversations[i].meta["scores"]["coverage"] - 5)
             for i in (0, 1)]
    metrics = summary_eval.score_outputs(conversations, outputs)["metrics"]
    assert metrics["valid_rate"] == pytest.approx(2 / 8)
    assert metrics["agreement"]["total"]["mae"] == pytest.approx(sum(drops) / 2)
    assert metrics["agreement"]["coverage"]["mae"] == pytest.approx(sum(drops) / 2)
    assert metrics["agreement"]["grammar"]["mae"] == 0.0
    with pytest.raises(ValueError, match="pair up"):
        summary_eval.score_outputs(conversations, outputs[:3])


def test_val_file_evaluation_reads_only_that_file(tmp_path, data_file, monkeypatch):
    """Issue 16: an adapter trained on the hub set, evaluated offline on a named validation file."""
    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was asked for data the evaluation does not need")

    monkeypatch.setattr(sources, "load_hub_records", no_hub)
    adapter = tmp_path / "checkpoints" / "step-000020"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    RunConfig(data=DataConfig(lang="en", max_val_samples=3)).save(adapter / "run_config.json")  # the hub default
    args = build_parser("test").parse_args(["--val-file", str(data_file)])
    cfg = config_for_eval(args, str(adapter))
    conversations = get_task("summary_eval").validation_conversations(cfg.data, cfg.train.seed)
    assert [c.meta["id"] for c in conversations] == ["r0", "r1", "r2"]  # the file's rows, capped at 3
    assert cfg.data.lang == "en"


# ------------------------------------------------------------------------------------------------------- the script


def _run_script(monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])
    runpy.run_path(str(SCRIPT), run_name="__main__")


def _save_adapter(tiny_model_dir: Path, folder: Path, data_file: Path) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft_model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, target_modules=["q_proj"]), gradient_checkpointing=False)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=2.0)
    peft_model.save_pretrained(folder)
    cfg = RunConfig(model=ModelConfig(model=str(tiny_model_dir), quant="none"),
                    data=DataConfig(data=str(data_file), lang="en", max_val_samples=2))
    cfg.save(folder / "run_config.json")


def test_script_base_model_end_to_end(monkeypatch, tmp_path, tiny_model_dir, data_file, capsys):
    out = tmp_path / "eval"
    _run_script(monkeypatch, "--model", str(tiny_model_dir), "--quant", "none", "--data", str(data_file), "--lang",
                "en", "--max-val-samples", "2", "--max-new-tokens", "8", "--output-dir", str(out), "--no-progress",
                "--mode", "scores")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    base = report["systems"]["base"]
    assert base["n"] == 2 and len(base["outputs"]) == 2
    assert base["metrics"]["valid_rate"] == 1.0 and base["metrics"]["generation"]["mode"] == "scores"
    assert report["settings"]["data"]["data"] == str(data_file)
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| valid_rate | 1 |" in md and (out / "base_scatter_total.png").is_file()
    assert "report:" in capsys.readouterr().out


def test_script_adapter_compare_with_training_defaults(monkeypatch, tmp_path, tiny_model_dir, data_file):
    adapter = tmp_path / "run" / "adapter"
    _save_adapter(tiny_model_dir, adapter, data_file)
    # Model, quantization, data and language all come from the adapter's run_config.json.
    _run_script(monkeypatch, "--adapter", str(adapter), "--compare", "--max-new-tokens", "6", "--no-progress")
    report = json.loads((adapter / "eval" / "report.json").read_text(encoding="utf-8"))
    assert list(report["systems"]) == ["base", "adapter"]
    assert report["settings"]["model"]["model"] == str(tiny_model_dir) and report["settings"]["data"]["lang"] == "en"
    assert all(s["n"] == 2 for s in report["systems"].values())
    md = (adapter / "eval" / "report.md").read_text(encoding="utf-8")
    assert "| metric | base | adapter |" in md and "Generated (base)" in md and "Generated (adapter)" in md


def test_flags_override_training_defaults(tmp_path, data_file):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    RunConfig(model=ModelConfig(model="some/model", quant="nf4"), data=DataConfig(data=str(data_file), lang="en"),
              ).save(adapter / "run_config.json")
    args = build_parser("test").parse_args(["--lang", "ko", "--seed", "7"])
    cfg = config_for_eval(args, str(adapter))
    assert (cfg.model.model, cfg.model.quant, cfg.data.data) == ("some/model", "nf4", str(data_file))
    assert (cfg.data.lang, cfg.train.seed) == ("ko", 7)
    with pytest.raises(UserError, match="not an adapter folder"):
        config_for_eval(args, str(tmp_path))
    RunConfig(data=DataConfig(demo=True)).save(adapter / "run_config.json")
    cfg = config_for_eval(build_parser("test").parse_args(["--val-file", "v.jsonl"]), str(adapter))
    assert (cfg.data.demo, cfg.data.val_file) == (False, "v.jsonl")  # a new data source replaces the demo set


def _judgment_rows() -> list[dict]:
    rows = []
    for doc in range(2):
        article = news_record(doc)["article"]
        reference = news_record(doc)["highlights"]
        for system, summary in enumerate([reference.replace(" .", "."), article, "Something else entirely."]):
            rows.append({"doc_id": f"d{doc}", "system_id": f"M{system}", "article": article, "summary": summary,
                         "references": [reference], "coherence": 4 - system, "consistency": 5 - system / 2,
                         "fluency": 3 + system / 3, "relevance": 5 - system})
    return rows


def test_script_human_judgments_end_to_end(monkeypatch, tmp_path, tiny_model_dir):
    path = tmp_path / "summeval.jsonl"
    rows = _judgment_rows()
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "human"
    _run_script(monkeypatch, "--model", str(tiny_model_dir), "--quant", "none", "--lang", "en", "--human-judgments",
                str(path), "--max-new-tokens", "4", "--output-dir", str(out), "--no-progress", "--mode", "free")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    base = report["systems"]["base"]
    assert base["n"] == 6 and base["metrics"]["valid_rate"] == 0.0
    assert base["metrics"]["pairs"]["total ~ mean"]["spearman"] is None  # no valid answers: no correlation
    # ROUGE-1 on the same rows: in both documents the copied reference scores highest, the unrelated text lowest,
    # and relevance falls with the system index: rho = 1 in each document.
    rouge1 = [rouge_pair(r["summary"], r["references"][0])["rouge1"].fmeasure for r in rows]
    assert rouge1[0] > rouge1[1] > rouge1[2] and rouge1[3] > rouge1[4] > rouge1[5]
    assert report["rouge_correlations"]["rouge1"]["relevance"] == {
        "spearman": pytest.approx(1.0), "kendall": pytest.approx(1.0), "documents": 2, "documents_total": 2}
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| metric | coherence | consistency | fluency | relevance | mean |" in md
    assert "| ROUGE-1 | 1.000 / 1.000 |" in md


def test_bad_human_judgment_row_exits_2(monkeypatch, tmp_path, tiny_model_dir, capsys):
    rows = _judgment_rows()
    del rows[1]["fluency"]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        _run_script(monkeypatch, "--model", str(tiny_model_dir), "--quant", "none", "--human-judgments", str(path),
                    "--output-dir", str(tmp_path / "out"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{path}: line 2: missing field 'fluency'" in err
    assert not (tmp_path / "out").exists()  # checked before anything is written


def test_compare_without_adapter_exits_2(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run_script(monkeypatch, "--compare")
    assert exit_info.value.code == 2 and "--adapter" in capsys.readouterr().err
    with pytest.raises(UserError, match="max_new_tokens"):
        EvalConfig(max_new_tokens=0)
