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
        # each kind's mean expected total: guided modes only (free answers have no distribution to read)
        assert all(0 <= part["expected_mean"] <= 100 for part in scores["by_kind"].values())
        assert sum(len(part["predicted_totals"]) for part in scores["by_kind"].values()) == 4
        assert all(p["expected_mean"] is None for p in result["systems"][system]["free"]["by_kind"].values())
    capsys.readouterr()
    evaluator_quality.main(argv)  # everything is there: no training, no grading again
    assert "grading" not in capsys.readouterr().out
    evaluator_quality.main([*argv, "--regrade", "--systems", "base", "--modes", "scores"])
    assert capsys.readouterr().out.count("grading 4 summaries") == 1
    evaluator_quality.main([*argv, "--without-reference", "--systems", "adapter", "--modes", "scores"])
    result = json.loads(out.read_text(encoding="utf-8"))
    assert set(result["systems"]["adapter"]) == {"scores", "free", "scores-noref"}
    assert result["systems"]["adapter"]["scores-noref"]["valid_rate"] == 1.0
    capsys.readouterr()
    evaluator_quality.main([*argv, "--table-only"])
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| system | mode | valid |") and sum("| adapter | scores" in t for t in table) == 2
    assert all(("(" in row) == ("| scores" in row) for row in table[2:])  # expected means in brackets: scores only
    assert json.loads(out.read_text(encoding="utf-8"))["systems"] == result["systems"]


def test_kind_order_reads_integer_or_expected_means():
    def kinds(**means):
        return {kind: {"predicted_mean": p, "expected_mean": e} for kind, (p, e) in means.items()}

    # integer totals all equal (the order fails) while the expected totals still rank the kinds
    by_kind = kinds(near_reference=(75, 80.0), lead=(75, 70.0), partial=(75, 71.0), off_topic=(75, 60.0),
                    empty=(50, 40.0))
    assert evaluator_quality.kind_order_holds(by_kind) is False
    assert evaluator_quality.kind_order_holds(by_kind, "expected_mean") is True
    by_kind["partial"]["expected_mean"] = 59.0  # below off_topic's 60: the middle group no longer sits above
    assert evaluator_quality.kind_order_holds(by_kind, "expected_mean") is False
    del by_kind["near_reference"]
    assert evaluator_quality.kind_order_holds(by_kind, "expected_mean") is None
