"""The bad-input catalogue through ``scripts/train.py``: each case gives one ``error:`` line naming what and where,
exit code 2, and leaves an existing run (its checkpoints above all) byte for byte as it was. Damaged adapter and
checkpoint files (cut short, broken JSON) give the same one line through ``train.py --resume``, ``grade.py`` and
``evaluate.py``.

The cases run in-process (``runpy``) against one tiny trained run; the disk-full case runs the script in a child
process whose file-size limit (``RLIMIT_FSIZE``) makes the checkpoint write fail inside torch's own writer.
"""

from __future__ import annotations

import json
import os
import resource
import runpy
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from gemma_lowmem.checkpoint import find_checkpoint
from gemma_lowmem.tasks.summary_eval import DEMO_FILE
from tests.tiny import tiny_gemma3, tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add spinning on shared cores
    yield
    torch.set_num_threads(before)


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def demo_rows() -> list[dict]:
    rows = [json.loads(line) for line in DEMO_FILE.read_text(encoding="utf-8").splitlines()]
    return [{"article": r["article"], "highlights": r["highlights"]} for r in rows[:6]]


def script_argv(model: Path, data: Path, run: Path, cache: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--quant", "none", "--train-file", str(data), "--val-file", str(data),
            "--lang", "en", "--max-seq-length", "3072", "--max-article-length", "300", "--batch-size", "1",
            "--grad-accum", "1", "--eval-every", "0", "--save-every", "1", "--output-dir", str(run),
            "--cache-dir", str(cache), *extra]


def run_script(argv: list[str], capsys, monkeypatch, script: str = "train.py") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", [script, *argv])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = 0
    try:
        runpy.run_path(str(ROOT / "scripts" / script), run_name="__main__")
    except SystemExit as exit_info:
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, demo_rows) -> dict[str, Path]:
    """A tiny model folder, a good data file and a run with two checkpoints, made through the script."""
    base = tmp_path_factory.mktemp("bad-input")
    model = base / "model"
    tiny_gemma3().save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    data = write_rows(base / "good.jsonl", demo_rows)
    paths = {"base": base, "model": model, "data": data, "run": base / "run", "cache": base / "cache"}
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(sys, "argv", ["train.py", *script_argv(model, data, paths["run"], paths["cache"],
                                                                   "--max-steps", "2")])
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        runpy.run_path(str(ROOT / "scripts" / "train.py"), run_name="__main__")
    assert find_checkpoint(paths["run"]).name == "step-000002"
    return paths


def _bad_rows(base: Path, demo_rows: list[dict], case: str) -> Path:
    good = [json.dumps(r) for r in demo_rows]
    path = base / f"{case}.jsonl"
    if case == "malformed":
        path.write_text("\n".join([good[0], '{"article": "An article", "highlights": ', *good[1:]]) + "\n")
    elif case == "missing_field":
        path.write_text("\n".join([*good[:2], json.dumps({"article": "Only an article."}), *good[2:]]) + "\n")
    elif case == "empty":
        path.write_text("")
    elif case == "wrong_type":
        path.write_text("\n".join([good[0], json.dumps({"article": 123, "highlights": "A summary."})]) + "\n")
    elif case == "not_utf8":
        path.write_bytes(good[0].encode() + b"\n" + "{\"article\": \"caf\u00e9\"}".encode("latin-1") + b"\n")
    return path


DATA_CASES = {
    "malformed": ["line 2", "malformed JSON"],
    "missing_field": ["line 3", "missing field 'highlights'"],
    "empty": ["no usable rows"],
    "wrong_type": ["line 2", "field 'article' must be text, got int"],
    "not_utf8": ["line 2", "not UTF-8", "re-save the file as UTF-8"],
}


def assert_one_error(code: int, err: str, *needles: str) -> str:
    assert code == 2, err[-2000:]
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-2000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", DATA_CASES)
def test_bad_data_file(case, trained, demo_rows, capsys, monkeypatch):
    before = snapshot(trained["run"])
    data = _bad_rows(trained["base"], demo_rows, case)
    code, out, err = run_script(script_argv(trained["model"], data, trained["run"], trained["cache"]), capsys,
                                monkeypatch)
    assert_one_error(code, err, data.name, *DATA_CASES[case])
    assert "memory plan" not in out  # the data is read before the plan is printed: its error comes first and alone
    assert snapshot(trained["run"]) == before


def test_a_10_mb_article_is_cut_not_fatal(trained, demo_rows, capsys, monkeypatch):
    sentence = "The council met again on Tuesday to discuss the budget for the new bridge. "
    huge = {"article": sentence * (10 * 2**20 // len(sentence)), "highlights": "The council met.\nOn a bridge."}
    data = write_rows(trained["base"] / "huge.jsonl", [huge, *demo_rows[:3]])
    assert data.stat().st_size > 10 * 10**6
    run = trained["base"] / "huge-run"
    code, out, err = run_script(script_argv(trained["model"], data, run, trained["cache"], "--max-steps", "1"),
                                capsys, monkeypatch)
    assert code == 0, err[-2000:]
    assert "done: 1 steps" in out and find_checkpoint(run).name == "step-000001"


def _empty_output_model(base: Path) -> Path:
    """A model folder whose tokenizer knows only its special tokens and has no unknown token: any text -> []."""
    folder = base / "model-empty-tokenizer"
    tiny_gemma3().save_pretrained(folder)
    backend = Tokenizer(models.BPE(vocab={"<pad>": 0, "<eos>": 1, "<bos>": 2}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                            pad_token="<pad>").save_pretrained(folder)
    return folder


CLI_CASES = {
    "unknown_task": (["--task", "poetry"], ["unknown task 'poetry'"]),
    "max_mem_below_weights": (["--max-mem", "10KB"], ["--max-mem", "10KB", "below"]),
    "empty_tokenizer_output": (["--model", "<empty-tokenizer>"], ["tokenized to nothing"]),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_flag_or_model(case, trained, capsys, monkeypatch):
    before = snapshot(trained["run"])
    flags, needles = CLI_CASES[case]
    if "<empty-tokenizer>" in flags:
        flags = ["--model", str(_empty_output_model(trained["base"]))]
    code, _, err = run_script(script_argv(trained["model"], trained["data"], trained["run"], trained["cache"],
                                          *flags), capsys, monkeypatch)
    assert_one_error(code, err, *needles)
    assert snapshot(trained["run"]) == before


@pytest.mark.parametrize("content,needles", [
    ({"train": {"learning_rate": 1e-4}}, ["unknown key 'train.learning_rate'", "known: "]),
    ({"train": {"lr": "fast"}}, ["train.lr='fast'", "wrong type: expected float"]),
    ({"train": {"max_steps": 2.5}}, ["train.max_steps=2.5", "wrong type: expected int"]),
], ids=["unknown_key", "string_for_float", "float_for_int"])
def test_bad_config_file(content, needles, trained, capsys, monkeypatch):
    before = snapshot(trained["run"])
    config = trained["base"] / "run.json"
    config.write_text(json.dumps(content))
    code, _, err = run_script(["--config", str(config), *script_argv(trained["model"], trained["data"],
                                                                     trained["run"], trained["cache"])],
                              capsys, monkeypatch)
    assert_one_error(code, err, "run.json", *needles)
    assert snapshot(trained["run"]) == before


def test_output_folder_that_is_a_file(trained, capsys, monkeypatch):
    blocker = trained["base"] / "blocker.txt"
    blocker.write_text("not a folder")
    code, _, err = run_script(script_argv(trained["model"], trained["data"], blocker, trained["cache"]), capsys,
                              monkeypatch)
    assert_one_error(code, err, "blocker.txt", "not a folder")
    assert blocker.read_text() == "not a folder"


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    return apply


@pytest.mark.parametrize("limit_kb", [200, 40], ids=["trainer-state-fails", "adapter-fails"])
def test_disk_full_while_saving_keeps_the_last_checkpoint(trained, limit_kb):
    """Resume the trained run with the largest file capped: the adapter (131 KB) or the trainer state (~270 KB)
    cannot be written. The script says where, exits 2, and the checkpoints are untouched and loadable."""
    before = snapshot(trained["run"] / "checkpoints")
    argv = script_argv(trained["model"], trained["data"], trained["run"], trained["cache"], "--resume",
                       str(trained["run"]), "--max-steps", "4")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *argv], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(limit_kb * 1024))
    line = assert_one_error(done.returncode, done.stderr, "could not write", "step-000003", "File too large",
                            "--resume")
    assert "Traceback" not in done.stderr, line
    assert snapshot(trained["run"] / "checkpoints") == before
    assert not [p for p in trained["run"].rglob(".*-*")]  # nothing half-written left behind
    assert find_checkpoint(trained["run"]).name == "step-000002"


def _damage(path: Path, how: str) -> None:
    if how == "cut":  # a copy that did not finish
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "broken":
        path.write_text('{"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"', encoding="utf-8")
    else:  # whole JSON, but a field PEFT cannot use
        path.write_text(json.dumps({**json.loads(path.read_text(encoding="utf-8")), "r": "eight"}), encoding="utf-8")


def _damaged_copy(trained: dict[str, Path], name: str, file: str, how: str) -> Path:
    """A copy of the trained run with one of its files damaged (the run itself stays as it was)."""
    run = trained["base"] / name
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(trained["run"], run)
    _damage(run / file, how)
    return run


@pytest.mark.parametrize("file,needles", [
    ("adapter_model.safetensors", ["not a whole safetensors file", "incomplete metadata"]),
    ("trainer_state.pt", ["unreadable", "cut short or damaged"]),
], ids=["adapter-cut", "trainer-state-cut"])
def test_resume_from_a_damaged_checkpoint(file, needles, trained, capsys, monkeypatch):
    run = _damaged_copy(trained, f"damaged-{file}", f"checkpoints/step-000002/{file}", "cut")
    code, _, err = run_script(script_argv(trained["model"], trained["data"], run, trained["cache"], "--resume",
                                          str(run), "--max-steps", "3"), capsys, monkeypatch)
    line = assert_one_error(code, err, f"step-000002/{file}", *needles)
    assert f"--resume {run / 'checkpoints' / 'step-000001'}" in line  # the checkpoint before, to resume from
    assert "Traceback" not in err


@pytest.mark.parametrize("script", ["grade.py", "evaluate.py"])
@pytest.mark.parametrize("file,how,needles", [
    ("adapter_model.safetensors", "cut", ["not a whole safetensors file", "cut short or damaged"]),
    ("adapter_config.json", "broken", ["not valid JSON", "at line 1, column", "cut short or damaged"]),
], ids=["weights-cut", "config-broken"])
def test_a_damaged_adapter_is_one_line_naming_the_file(script, file, how, needles, trained, capsys, monkeypatch):
    adapter = _damaged_copy(trained, f"damaged-{script}-{how}", f"adapter/{file}", how) / "adapter"
    argv = ["--adapter", str(adapter), *(["--text", "An article.", "A summary."] if script == "grade.py" else [])]
    code, _, err = run_script(argv, capsys, monkeypatch, script=script)
    assert_one_error(code, err, str(adapter / file), *needles)
    assert "Traceback" not in err


def test_an_adapter_peft_refuses_is_a_user_error(trained):
    """The files are whole but PEFT cannot use them (a field of the wrong type): one line, naming the config."""
    from gemma_lowmem.errors import UserError
    from gemma_lowmem.model import load_adapter

    adapter = _damaged_copy(trained, "refused", "adapter/adapter_config.json", "wrong_type") / "adapter"
    with pytest.raises(UserError, match=r"adapter: this adapter does not load onto .*adapter_config\.json"):
        load_adapter(tiny_gemma3(), adapter)
