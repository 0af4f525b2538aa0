"""scripts/train.py on bad input: one clear ``error:`` line, exit code 2, and no half-written output."""

from __future__ import annotations

import json
import runpy
import shlex
import sys
from pathlib import Path

import pytest

from gemma_lowmem.cli import build_parser, config_from_args
from gemma_lowmem.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def run_train(argv: list[str], capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a hub id fails at once instead of retrying the network
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / "train.py"), run_name="__main__")
    return exit_info.value.code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_model_path(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    code, err = run_train(["--demo", "--model", str(tmp_path / "nowhere"), "--output-dir", str(out)], capsys,
                          monkeypatch)
    assert_one_error_line(code, err, "nowhere", "no such local path")
    assert not out.exists()


def test_unknown_model_name(capsys, monkeypatch):
    code, err = run_train(["--model", "not-a-model"], capsys, monkeypatch)
    assert_one_error_line(code, err, "not-a-model", "gemma-3-270m")


def test_offline_hub_id_names_demo_and_model_path(tmp_path, capsys, monkeypatch):
    code, err = run_train(["--output-dir", str(tmp_path / "run")], capsys, monkeypatch)
    assert_one_error_line(code, err, "--demo", "--model PATH")
    assert not (tmp_path / "run").exists()


def test_gguf_of_unsupported_architecture(tmp_path, capsys, monkeypatch):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "no-such-arch")
    writer.add_tensor("w", __import__("numpy").zeros((2, 2), dtype="float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    monkeypatch.setattr("gemma_lowmem.model.CACHE", tmp_path / "cache")
    code, err = run_train(["--model", str(path)], capsys, monkeypatch)
    assert_one_error_line(code, err, "odd.gguf", "cannot load this GGUF")
    assert not (tmp_path / "cache" / "converted").exists() or not any((tmp_path / "cache" / "converted").iterdir())


def test_max_mem_that_is_not_a_size(capsys, monkeypatch):
    code, err = run_train(["--demo", "--max-mem", "lots"], capsys, monkeypatch)
    assert_one_error_line(code, err, "'lots'", "8GB")


def test_max_mem_below_the_weights(tiny_model_dir, tmp_path, capsys, monkeypatch):
    code, err = run_train(["--demo", "--model", str(tiny_model_dir), "--quant", "none", "--max-mem", "10KB",
                           "--output-dir", str(tmp_path / "run")], capsys, monkeypatch)
    assert_one_error_line(code, err, "--max-mem 10KB is below the frozen weights", "training needs at least")
    assert not (tmp_path / "run").exists()


def test_max_mem_too_small_for_the_batch_size_given(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """The planner keeps what the user set; when that cannot fit, the error names the setting."""
    code, err = run_train(["--demo", "--model", str(tiny_model_dir), "--max-mem", "2GB", "--batch-size", "64",
                           "--max-seq-length", "4096", "--output-dir", str(tmp_path / "run")], capsys, monkeypatch)
    assert_one_error_line(code, err, "--max-mem 2GB", "batch_size=64", "leave them out")
    assert not (tmp_path / "run").exists()


def test_output_dir_that_is_a_file(tiny_model_dir, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    code, err = run_train(["--demo", "--model", str(tiny_model_dir), "--output-dir", str(blocker)], capsys,
                          monkeypatch)
    assert_one_error_line(code, err, "file.txt", "not a folder")
    assert blocker.read_text() == "not a folder"


def test_resume_from_a_folder_that_is_not_a_checkpoint(tiny_model_dir, tmp_path, capsys, monkeypatch):
    code, err = run_train(["--demo", "--model", str(tiny_model_dir), "--resume", str(tmp_path)], capsys,
                          monkeypatch)
    assert_one_error_line(code, err, "--resume", "not a checkpoint")


def test_unknown_task(tiny_model_dir, capsys, monkeypatch):
    code, err = run_train(["--demo", "--model", str(tiny_model_dir), "--task", "poetry"], capsys, monkeypatch)
    assert_one_error_line(code, err, "unknown task 'poetry'")


def test_config_file_with_unknown_key_or_wrong_type(tmp_path, capsys, monkeypatch):
    bad_key = tmp_path / "a.json"
    bad_key.write_text(json.dumps({"train": {"learning_rate": 1e-4}}))
    code, err = run_train(["--config", str(bad_key)], capsys, monkeypatch)
    assert_one_error_line(code, err, "a.json", "train.learning_rate")
    bad_type = tmp_path / "b.json"
    bad_type.write_text(json.dumps({"train": {"lr": "fast"}}))
    code, err = run_train(["--config", str(bad_type)], capsys, monkeypatch)
    assert_one_error_line(code, err, "b.json", "train.lr", "wrong type")


def test_precedence_defaults_preset_config_flags(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"train": {"epochs": 7}, "data": {"lang": "en"}}))
    parser = build_parser("test")
    cfg = config_from_args(parser.parse_args(["--preset", "high_lr", "--config", str(config), "--epochs", "2",
                                              "--lora-r", "8", "--no-packing", "--max-steps", "none"]))
    assert cfg.train.lr == 5e-4  # preset
    assert cfg.data.lang == "en"  # config file
    assert cfg.train.epochs == 2  # flag beats config file
    assert cfg.lora.r == 8 and cfg.train.packing is False and cfg.train.max_steps is None
    assert cfg.data.max_train_samples == 2000  # preset value equal to the default


def test_config_round_trip(tmp_path):
    cfg = RunConfig()
    cfg.save(tmp_path / "c.json")
    assert RunConfig.load(tmp_path / "c.json") == cfg


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit):
        build_parser("test").parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--quant", "--lora-r", "--task", "--lang", "--max-mem", "--grad-accum", "--packing",
                 "--resume", "--push-to-hub", "--preset", "--config"):
        assert flag in text


def test_freed_memory_goes_back_to_the_os_only_when_the_budget_is_tight(tiny_model_dir, monkeypatch):
    """glibc's retained blocks cost speed to give back, so the run does it only when the plan needs the room."""
    import torch

    from gemma_lowmem import run
    from gemma_lowmem.config import RunConfig, TrainConfig

    calls = []
    monkeypatch.setattr(run, "return_freed_memory_to_os", lambda: calls.append(True))
    roomy = RunConfig(train=TrainConfig(max_mem="64GB"))
    run.plan_budget(run.load_model_config(str(tiny_model_dir)), roomy, torch.device("cpu"), keep=())
    assert calls == []
    plan = run.plan_run(roomy, run.load_model_config(str(tiny_model_dir)), torch.device("cpu"))
    tight = RunConfig(train=TrainConfig(max_mem=str(int(plan.predicted_peak * 2))))  # fits, but not 3.2x over
    run.plan_budget(run.load_model_config(str(tiny_model_dir)), tight, torch.device("cpu"), keep=())
    assert calls == [True]


def test_columns_flag_takes_field_column_pairs_and_round_trips_through_config_json(tmp_path, capsys):
    parser = build_parser("test")
    args = parser.parse_args(["--columns", "article=text", "highlights=Reference Summary", "--columns", "id=doc"])
    cfg = config_from_args(args)
    assert cfg.data.columns == {"article": "text", "highlights": "Reference Summary", "id": "doc"}
    cfg.save(tmp_path / "c.json")
    assert RunConfig.load(tmp_path / "c.json").data.columns == cfg.data.columns  # a resumed run maps the same
    assert RunConfig().data.columns == {}
    for bad, needle in ((["--columns", "article"], "expects KEY=VALUE pairs such as article=text, got 'article'"),
                        (["--columns", "=text"], "got '=text'"),
                        (["--columns", "a=b", "a=c"], "names 'a' twice (a=b, a=c)")):
        with pytest.raises(SystemExit):
            build_parser("test").parse_args(bad)
        assert needle in capsys.readouterr().err


def test_columns_in_a_config_file_are_checked(tmp_path, capsys, monkeypatch):
    for value, needle in (([["article", "text"]], "data.columns=[['article', 'text']] has the wrong type"),
                          ({"article": ""}, "columns: 'article'='' must map a field name to a column name")):
        config = tmp_path / "run.json"
        config.write_text(json.dumps({"data": {"columns": value}}))
        code, err = run_train(["--config", str(config)], capsys, monkeypatch)
        assert_one_error_line(code, err, needle)


# ------------------------------------------------------------------------------- where the run's outputs are


def train_to_the_end(argv: list[str], capsys, monkeypatch) -> tuple[str, str]:
    """scripts/train.py in-process, expected to finish (exit code 0); its stdout and stderr (the loop's events)."""
    monkeypatch.setattr(sys, "argv", ["train.py", *argv])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        runpy.run_path(str(ROOT / "scripts" / "train.py"), run_name="__main__")
    except SystemExit as exit_info:
        assert exit_info.code in (0, None), capsys.readouterr().err[-2000:]
    captured = capsys.readouterr()
    return captured.out, captured.err


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    from gemma_lowmem.tasks.summary_eval import DEMO_FILE

    rows = [json.loads(line) for line in DEMO_FILE.read_text(encoding="utf-8").splitlines()[:6]]
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps({"article": r["article"], "highlights": r["highlights"]}) + "\n"
                            for r in rows), encoding="utf-8")
    return path


def run_flags(model: Path, data: Path, run: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--quant", "none", "--train-file", str(data), "--val-file", str(data),
            "--lang", "en", "--max-article-length", "300", "--max-val-samples", "2", "--batch-size", "1",
            "--grad-accum", "1", "--eval-every", "1", "--save-every", "1", "--output-dir", str(run),
            "--cache-dir", str(run.parent / "cache"), *extra]


def printed(out: str) -> dict[str, str]:
    """The end-of-run block: its first line under "run", then each "name: value" line."""
    lines = out[out.rindex("\nrun ") + 1:].splitlines()
    block = {"run": lines[0]}
    for line in lines[1:]:
        name, _, value = line.strip().partition(": ")
        block[name.split(" (")[0]] = value.strip()
    return block


def test_a_finished_run_prints_its_adapter_report_summary_and_a_resume_command_that_works(
        tiny_model_dir, small_data, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    out, err = train_to_the_end(run_flags(tiny_model_dir, small_data, run, "--max-steps", "2", "--evaluate",
                                     "--max-new-tokens", "4"), capsys, monkeypatch)
    block = printed(out)
    assert block["run"] == f"run finished: {run}"
    assert (Path(block["adapter"]) / "adapter_config.json").is_file() and Path(block["adapter"]) == run / "adapter"
    assert (Path(block["best adapter"]) / "adapter_config.json").is_file()
    assert Path(block["report"]) == run / "eval" / "report.md" and Path(block["report"]).is_file()
    assert json.loads(Path(block["summary"]).read_text())["stopped"] == "max_steps"
    command = shlex.split(block["resume"])
    assert command[:2] == ["python", "scripts/train.py"]
    # The printed command resumes this run from its last checkpoint (with one more step to train).
    out, err = train_to_the_end([*command[2:], "--max-steps", "3", "--no-evaluate"], capsys, monkeypatch)
    assert f"resumed from {run / 'checkpoints' / 'step-000002'} at step 2" in err
    assert json.loads((run / "summary.json").read_text())["steps"] == 3
    assert printed(out)["report"].startswith("none (evaluation off); write one with: python scripts/evaluate.py "
                                             f"--adapter {run / 'adapter'}")


def test_an_early_stopped_run_prints_where_things_are(tiny_model_dir, small_data, tmp_path, capsys, monkeypatch):
    from gemma_lowmem import train

    losses = iter(range(1, 100))  # validation loss that only rises: patience 1 stops at the second validation
    monkeypatch.setattr(train, "validation_loss", lambda *args, **kwargs: float(next(losses)))
    run = tmp_path / "run"
    out, err = train_to_the_end(run_flags(tiny_model_dir, small_data, run, "--max-steps", "10",
                                     "--early-stopping-patience", "1"), capsys, monkeypatch)
    block = printed(out)
    assert block["run"] == f"run stopped early (validation loss stopped improving): {run}"
    assert json.loads(Path(block["summary"]).read_text())["steps"] == 2
    assert Path(block["adapter"]).is_dir() and Path(block["best adapter"]).is_dir()
    assert block["resume"] == f"python scripts/train.py --config {run / 'config.json'} --resume {run}"


def test_a_run_stopped_by_a_signal_prints_where_things_are_and_skips_evaluation(
        tiny_model_dir, small_data, tmp_path, capsys, monkeypatch):
    import os
    import signal

    import torch

    from gemma_lowmem import train

    calls = {"n": 0}
    real_loss = train.sft_loss

    def loss_that_signals(model, batch, **kwargs):
        calls["n"] += torch.is_grad_enabled()  # training micro-batches only
        if torch.is_grad_enabled() and calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop finishes step 2, checkpoints it and stops
        return real_loss(model, batch, **kwargs)

    monkeypatch.setattr(train, "sft_loss", loss_that_signals)
    run = tmp_path / "run with space"
    out, err = train_to_the_end(run_flags(tiny_model_dir, small_data, run, "--max-steps", "10", "--evaluate"), capsys,
                           monkeypatch)
    block = printed(out)
    assert block["run"] == f"run stopped by a signal (the last step is checkpointed): {run}"
    assert block["report"].startswith("none (stopped by a signal)") and not (run / "eval").exists()
    assert json.loads(Path(block["summary"]).read_text())["stopped"] == "signal"
    assert shlex.split(block["resume"]) == ["python", "scripts/train.py", "--config", str(run / "config.json"),
                                            "--resume", str(run)]
    assert (run / "checkpoints" / "step-000002").is_dir()
