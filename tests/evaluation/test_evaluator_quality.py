"""benchmarks/evaluator_quality.py end to end on a tiny random model: trains, grades every system and mode,
writes its JSON, and a rerun resumes (nothing is redone)."""

import json
import sys
from pathlib import Path

from tests.tiny import news_record, tiny_gemma3, tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import evaluator_quality  # noqa: E402


def test_smoke_trains_grades_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("gemma_lowmem.evaluation.guided.SLOT_TOKENS", {"comment": 2, "feedback": 2, "suggestions": 2})
    model_dir = tmp_path / "tiny"
    tiny_gemma3().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(news_record(i)) + "\n" for i in range(12)), encoding="utf-8")
    out = tmp_path / "quality.json"
    argv = ["--data-file", str(data), "--train-rows", "8", "--eval-rows", "4", "--model", str(model_dir),
            "--quant", "none", "--max-steps", "1", "--max-seq-length", "2048", "--modes", "scores", "free",
            "--max-new-tokens", "3", "--lang", "en", "--out", str(out)]
    evaluator_quality.main(argv)
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["training"]["steps"] == 1
    assert not set(result["settings"]["train_ids"]) & set(result["settings"]["eval_ids"])
    for system in ("base", "adapter"):
        assert set(result["systems"][system]) == {"scores", "free"}
        scores = result["systems"][system]["scores"]
        assert scores["valid_rate"] == 1.0 and scores["agreement"]["total"]["n_valid"] == 4
        assert set(scores["expected_agreement"]) >= {"total", "coverage"} and scores["seconds_per_summary"] > 0
    evaluator_quality.main(argv)  # everything is there: no training, no grading again
    evaluator_quality.main([*argv, "--without-reference", "--systems", "adapter", "--modes", "scores"])
    result = json.loads(out.read_text(encoding="utf-8"))
    assert set(result["systems"]["adapter"]) == {"scores", "free", "scores-noref"}
    assert result["systems"]["adapter"]["scores-noref"]["valid_rate"] == 1.0
    capsys.readouterr()
    evaluator_quality.main([*argv, "--table-only"])
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| system | mode | valid |") and sum("| adapter | scores" in t for t in table) == 2
    assert json.loads(out.read_text(encoding="utf-8"))["systems"] == result["systems"]
