"""scripts/plan_memory.py plans as training does: the same flags, ``planner.plan_run`` (the load's peak, the per-layer
table's place) and the plan printed by ``planner.apply_plan``."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest

from gemma_lowmem.cli import run_script

ROOT = Path(__file__).resolve().parents[1]


def plan_script(args: list[str], monkeypatch, capsys) -> str:
    """scripts/plan_memory.py in-process; its stdout."""
    script = runpy.run_path(str(ROOT / "scripts" / "plan_memory.py"), run_name="plan_memory")
    monkeypatch.setattr(sys, "argv", ["plan_memory.py", *args])
    run_script(script["main"])
    return capsys.readouterr().out


class _Planned(Exception):
    """Raised where setup would start loading the tokenizer: the plan is printed by then."""


def training_plan(args: list[str], monkeypatch, capsys) -> str:
    """scripts/train.py in-process with ``args``, stopped once the plan is printed; the printed plan."""
    from gemma_lowmem import run

    def stop(*args, **kwargs):
        raise _Planned

    monkeypatch.setattr(run, "load_tokenizer", stop)
    monkeypatch.setattr(run, "return_freed_memory_to_os", lambda: None)  # a process-wide malloc setting
    monkeypatch.setattr(sys, "argv", ["train.py", *args])
    with pytest.raises(_Planned):
        runpy.run_path(str(ROOT / "scripts" / "train.py"), run_name="__main__")
    out = capsys.readouterr().out
    return out[out.index("memory plan for"):out.index("\nmodel ")]


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    from gemma_lowmem.tasks.summary_eval import DEMO_FILE

    lines = DEMO_FILE.read_text(encoding="utf-8").splitlines()[:4]
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps({k: json.loads(line)[k] for k in ("article", "highlights")}) + "\n"
                            for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "flags",
    [
        ["--max-mem", "64GB"],  # the planner chooses everything: one micro-batch, no recompute
        ["--max-mem", "2GB", "--batch-size", "1", "--grad-accum", "4", "--max-seq-length", "256"],  # kept as given
        # a tight budget: 4 rows of 8 per micro-batch
        ["--max-mem", "700MiB", "--no-packing", "--no-chunked-loss", "--lora-r", "4", "--dtype", "fp32"],
    ],
    ids=["planner-chooses", "batch-given", "tight-no-packing-full-logits"],
)
def test_the_plan_script_prints_the_plan_a_training_run_uses(flags, tiny_model_dir, rows, tmp_path, monkeypatch,
                                                               capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = ["--model", str(tiny_model_dir), "--quant", "none", "--train-file", str(rows), "--val-file", str(rows),
            "--lang", "en", "--max-article-length", "300", "--output-dir", str(tmp_path / "run"),
            "--cache-dir", str(tmp_path / "cache"), *flags]
    trained = training_plan(args, monkeypatch, capsys)
    planned = plan_script([*args, "--device", "cpu"], monkeypatch, capsys)
    assert "predicted peak" in trained and "micro-batch:" in trained
    assert planned.splitlines()[0].startswith(f"model {tiny_model_dir}: 2 layers")
    assert planned[planned.index("memory plan for"):].rstrip("\n") == trained.rstrip("\n")
    assert not (tmp_path / "run").exists()  # neither wrote anything


def test_the_plan_script_moves_e2bs_per_layer_table_off_a_simulated_t4_as_a_run_there_would(monkeypatch, capsys):
    """The step of E2B at 2048 tokens does not fit 8 GB with the per-layer table on the GPU: training keeps it on
    the CPU (``plan_run``'s fallback), and so does the plan the script prints."""
    out = plan_script(["--model", "gemma-3n-e2b", "--max-mem", "8GB", "--device", "cuda", "--gpu-capability", "7.5",
                       "--batch-size", "1", "--grad-accum", "1"], monkeypatch, capsys)
    assert "cuda, activations float16" in out and "float32 otherwise" in out  # a T4: fp16 autocast, fp32 weights
    assert "embeddings_on_cpu False -> True)" in out  # the last change the plan made
    assert "per-layer embedding table: on the CPU" in out and "loading (peak)" in out


def test_the_plan_script_stops_where_the_load_does_not_fit_as_training_does(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        plan_script(["--model", "gemma-3n-e2b", "--max-mem", "7GB", "--device", "cpu", "--precision", "fp32",
                     "--max-seq-length", "512", "--batch-size", "1", "--grad-accum", "1"], monkeypatch, capsys)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and len(err.splitlines()) == 1
    assert "loading gemma-3n-e2b peaks at" in err and "give --max-mem" in err


def test_the_plan_script_takes_the_training_flags_and_its_device_flags(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        plan_script(["--help"], monkeypatch, capsys)
    text = capsys.readouterr().out
    for flag in ("--model", "--quant", "--dtype", "--precision", "--max-mem", "--batch-size", "--grad-accum",
                 "--max-seq-length", "--task", "--packing", "--gradient-checkpointing", "--embeddings-on-cpu",
                 "--lora-r", "--config", "--device", "--gpu-capability"):
        assert flag in text
    with pytest.raises(SystemExit) as exit_:
        plan_script(["--model", "gemma-3n-e2b", "--device", "cuda", "--gpu-capability", "seven"], monkeypatch, capsys)
    assert exit_.value.code == 2 and "--gpu-capability 'seven' is not a compute capability" in capsys.readouterr().err
