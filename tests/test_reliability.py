"""Reliability of the loop on a tiny Gemma 3: exact resume, signals, non-finite steps, determinism, atomic saves,
and SIGKILL at random moments (also inside saves) with ``--resume`` working every time.

The kill test runs one child process that imports torch once and forks a training worker per attempt, so 20+
kills cost seconds, not 20 interpreter starts. Run this file as ``python -m tests.test_reliability kill-child ...``
to get that child.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import select
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gemma_lowmem import checkpoint
from gemma_lowmem.config import LoraConfig, TrainConfig
from gemma_lowmem.device import Precision
from gemma_lowmem.errors import UserError
from gemma_lowmem.loss import sft_loss
from gemma_lowmem.model import add_lora
from gemma_lowmem.tasks.summary_eval import DEMO_FILE
from tests.test_train import examples, fit_sft
from tests.tiny import tiny_gemma3

ROOT = Path(__file__).resolve().parents[1]
ADAPTER = "adapter_model.safetensors"


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def lora_model(seed: int = 0, dropout: float = 0.1) -> torch.nn.Module:
    model = tiny_gemma3()
    torch.manual_seed(seed)  # the LoRA init; a resumed run must overwrite it from the checkpoint
    return add_lora(model, LoraConfig(r=4, alpha=8, dropout=dropout), gradient_checkpointing=True)


def train_losses(history: list[dict]) -> list[tuple]:
    """(step, loss, val_loss) of every metrics record: what must match between runs (not timings)."""
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in history]


def adapter_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / ADAPTER)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = adapter_weights(a), adapter_weights(b)
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*-*"))


# ---------------------------------------------------------------------------------------------------- exact resume

def unseen_answers(n: int, seed: int) -> list[dict[str, list[int]]]:
    """Validation examples whose answers use token ids the training answers never do: as training fits its
    answers, validation loss soon rises, so early stopping triggers within a few steps."""
    out = []
    for e in examples(n, seed=seed):
        ids = [t if label == -100 else t + 500 for t, label in zip(e["input_ids"], e["labels"])]
        out.append({"input_ids": ids, "labels": [-100 if label == -100 else t for t, label in zip(ids, e["labels"])]})
    return out


RESUME_CFG = TrainConfig(
    max_steps=20, lr=0.1, scheduler="constant", warmup_ratio=0.0, batch_size=2, grad_accum=3, eval_every=2,
    early_stopping_patience=2, save_every=1, keep_checkpoints=100, pack_len=48,
)


@pytest.mark.parametrize("packing", [True, False], ids=["packing", "bucketing"])
def test_resume_from_every_step_equals_the_uninterrupted_run(tmp_path, packing):
    """Accumulation 3 over an epoch of 7 or 8 micro-batches: windows straddle epochs, and checkpoints fall
    mid-epoch; dropout needs the RNG restored; early stopping needs best_val and bad_evals restored."""
    cfg = replace(RESUME_CFG, packing=packing)
    data, val = examples(15, seed=11), unseen_answers(4, seed=12)
    full = fit_sft(lora_model(), data, val, cfg, run_dir=tmp_path / "full", show_progress=False)
    assert full.stopped == "early_stopping" and 3 < full.steps < cfg.max_steps, full.history
    assert len({r["epoch"] for r in full.history if "epoch" in r}) > 1  # the run crosses an epoch boundary
    for k in range(1, full.steps):
        resumed_dir = tmp_path / f"from-{k}"
        resumed_cfg = replace(cfg, resume=str(tmp_path / "full" / "checkpoints" / f"step-{k:06d}"))
        resumed = fit_sft(lora_model(seed=100 + k), data, val, resumed_cfg, run_dir=resumed_dir,
                          show_progress=False)
        expected = [r for r in train_losses(full.history) if r[0] > k]
        assert train_losses(resumed.history) == expected, k
        assert (resumed.stopped, resumed.steps, resumed.best_val_loss) == (full.stopped, full.steps,
                                                                          full.best_val_loss)
        assert (resumed.tokens, resumed.loss_tokens) == (full.tokens, full.loss_tokens)
        assert_same_weights(resumed_dir / "adapter", tmp_path / "full" / "adapter")


def test_resume_refuses_another_data_order_or_adapter_shape(tmp_path):
    data = examples(8)
    cfg = TrainConfig(max_steps=2, save_every=1, eval_every=0, packing=False)
    fit_sft(lora_model(), data, [], cfg, run_dir=tmp_path / "a", show_progress=False)
    with pytest.raises(UserError, match="batch_size was 2, now 4"):
        fit_sft(lora_model(), data, [], replace(cfg, batch_size=4, resume=str(tmp_path / "a")),
                run_dir=tmp_path / "b", show_progress=False)
    other_rank = add_lora(tiny_gemma3(), LoraConfig(r=8, alpha=8), gradient_checkpointing=False)
    with pytest.raises(UserError, match="does not fit"):
        fit_sft(other_rank, data, [], replace(cfg, resume=str(tmp_path / "a")), run_dir=tmp_path / "c",
                show_progress=False)


# --------------------------------------------------------------------------------------------------------- signals


def signalling_loss(calls_to_signal: dict[int, signal.Signals]):
    """sft_loss that sends itself a signal on the given (1-based) micro-batch calls: mid-window, mid-step."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += torch.is_grad_enabled()  # training micro-batches only, not validation
        if torch.is_grad_enabled() and calls["n"] in calls_to_signal:
            os.kill(os.getpid(), calls_to_signal[calls["n"]])
        return sft_loss(model, batch)

    return loss_fn


SIGNAL_CFG = TrainConfig(max_steps=6, lr=5e-3, batch_size=2, grad_accum=2, eval_every=2, save_every=0, pack_len=64)


def test_signal_saves_at_the_step_boundary_and_resume_continues_exactly(tmp_path, capsys):
    data, val = examples(16, seed=4), examples(4, seed=5)
    full = fit_sft(lora_model(), data, val, SIGNAL_CFG, run_dir=tmp_path / "full", show_progress=False)
    handler = signal.getsignal(signal.SIGTERM)
    # micro-batch 7 is the first half of step 4's window: the step finishes, then the run stops
    stopped = fit_sft(lora_model(), data, val, SIGNAL_CFG, run_dir=tmp_path / "run", show_progress=False,
                      loss_fn=signalling_loss({7: signal.SIGTERM}))
    assert stopped.stopped == "signal" and stopped.steps == 4
    assert signal.getsignal(signal.SIGTERM) == handler  # the loop's handler is gone again
    err = capsys.readouterr().err  # the loop's events go to stderr
    assert f"checkpoint saved in {tmp_path / 'run' / 'checkpoints' / 'step-000004'}" in err
    assert not (tmp_path / "run" / "checkpoints" / "step-000005").exists()
    resumed = fit_sft(lora_model(seed=7), data, val, replace(SIGNAL_CFG, resume=str(tmp_path / "run")),
                      run_dir=tmp_path / "run", show_progress=False)
    assert train_losses(resumed.history) == train_losses(full.history)  # one log: first part, then the rest
    assert_same_weights(tmp_path / "run" / "adapter", tmp_path / "full" / "adapter")


def test_a_second_signal_stops_at_once_without_touching_checkpoints(tmp_path):
    cfg = replace(SIGNAL_CFG, save_every=1)
    with pytest.raises(KeyboardInterrupt):
        fit_sft(lora_model(), examples(16, seed=4), [], cfg, run_dir=tmp_path, show_progress=False,
                loss_fn=signalling_loss({5: signal.SIGINT, 6: signal.SIGINT}))
    folders = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert folders == ["step-000001", "step-000002"]  # step 3 was never saved; the last two are intact
    state = checkpoint.load_checkpoint(tmp_path / "checkpoints" / "step-000002", lora_model())
    assert state["counters"]["step"] == 2


# ----------------------------------------------------------------------------------------------- numerical faults


class _InfGradient(torch.autograd.Function):
    """Identity forward, infinite backward: a finite loss with a non-finite gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def faulty_loss(bad: dict[int, str], grad_accum: int):
    """sft_loss whose optimizer steps in ``bad`` (1-based) get a NaN loss ("loss") or an infinite gradient."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        loss = sft_loss(model, batch)
        kind = bad.get((calls["n"] - 1) // grad_accum + 1)
        if kind == "loss":
            return loss * float("nan")
        return _InfGradient.apply(loss) if kind == "grad" else loss

    return loss_fn


def test_non_finite_steps_are_skipped_counted_and_logged(tmp_path):
    cfg = TrainConfig(max_steps=5, lr=1e-2, grad_accum=2, eval_every=0, save_every=1, keep_checkpoints=10,
                      packing=False)
    result = fit_sft(lora_model(dropout=0.0), examples(12), [], cfg, run_dir=tmp_path, show_progress=False,
                     loss_fn=faulty_loss({2: "loss", 4: "grad"}, cfg.grad_accum))
    assert result.stopped == "max_steps" and result.skipped_steps == 2
    records = {r["step"]: r for r in result.history if "loss" in r}
    assert records[2]["loss"] is None and records[2]["skipped"] == 1
    assert records[4]["loss"] is not None and records[4]["grad_norm"] is None and records[4]["skipped"] == 2
    assert all(records[s]["loss"] is not None and "skipped" not in records[s] for s in (1, 3, 5))
    steps = tmp_path / "checkpoints"
    for skipped in (2, 4):  # a skipped step leaves the adapter and the optimizer state as they were
        assert_same_weights(steps / f"step-{skipped:06d}", steps / f"step-{skipped - 1:06d}")
        before, after = (torch.load(steps / f"step-{s:06d}" / checkpoint.STATE_FILE, weights_only=False)
                         for s in (skipped - 1, skipped))
        assert torch.equal(before["optimizer"]["state"][0]["exp_avg"], after["optimizer"]["state"][0]["exp_avg"])
    with pytest.raises(AssertionError):  # and a step that was not skipped did change them
        assert_same_weights(steps / "step-000003", steps / "step-000002")


def test_k_non_finite_steps_in_a_row_stop_with_the_last_good_state(tmp_path):
    cfg = TrainConfig(max_steps=20, lr=1e-2, grad_accum=2, eval_every=0, save_every=1, keep_checkpoints=10,
                      max_bad_steps=3, packing=False)
    with pytest.raises(UserError, match=r"3 optimizer steps in a row had a non-finite loss .* step 5") as info:
        fit_sft(lora_model(dropout=0.0), examples(12), [], cfg, run_dir=tmp_path, show_progress=False,
                loss_fn=faulty_loss({s: "loss" for s in range(3, 21)}, cfg.grad_accum))
    saved = tmp_path / "checkpoints" / "step-000005"
    assert str(saved) in str(info.value)
    assert_same_weights(saved, tmp_path / "checkpoints" / "step-000002")  # the weights of the last good step
    assert checkpoint.find_checkpoint(tmp_path) == saved


def test_fp16_scaler_overflows_are_routine_until_the_scale_drops_below_one(tmp_path, monkeypatch):
    """The GradScaler path (fp16 on GPUs), run on the CPU with a scaler: overflowing gradients lower the scale and
    skip the step without counting toward max_bad_steps; non-finite losses do count."""
    monkeypatch.setattr("gemma_lowmem.train.resolve_precision", lambda device, name: Precision("cpu", None, True))
    cfg = TrainConfig(max_steps=12, lr=1e-2, grad_accum=1, eval_every=0, save_every=0, max_bad_steps=2,
                      packing=False)
    bad = {1: "grad", 2: "grad", 3: "grad", 4: "grad", 6: "loss", 7: "loss", 8: "loss"}
    with pytest.raises(UserError, match="2 optimizer steps in a row"):
        fit_sft(lora_model(dropout=0.0), examples(12), [], cfg, run_dir=tmp_path, show_progress=False,
                loss_fn=faulty_loss(bad, cfg.grad_accum))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "skipped" in r] == [1, 2, 3, 4, 6, 7]
    scales = [r["loss_scale"] for r in records]
    assert scales[:5] == [2.0**15, 2.0**14, 2.0**13, 2.0**12, 2.0**12]  # halved by each overflow, kept by step 5


# --------------------------------------------------------------------------------------------------- determinism


def test_the_same_seed_gives_the_same_losses(tmp_path):
    cfg = TrainConfig(max_steps=4, lr=1e-2, grad_accum=2, eval_every=2, save_every=0, pack_len=64)
    data, val = examples(12), examples(3, seed=9)
    runs = [fit_sft(lora_model(), data, val, replace(cfg, seed=seed), run_dir=tmp_path / f"{i}", show_progress=False)
            for i, seed in enumerate((42, 42, 43))]
    assert train_losses(runs[0].history) == train_losses(runs[1].history)
    assert train_losses(runs[0].history) != train_losses(runs[2].history)


# ------------------------------------------------------------------------------------------------- atomic saves


def saved_model(tmp_path: Path, steps: int = 2) -> torch.nn.Module:
    model = lora_model()
    fit_sft(model, examples(8), [], TrainConfig(max_steps=steps, save_every=1, keep_checkpoints=10, eval_every=0,
                                                packing=False), run_dir=tmp_path, show_progress=False)
    return model


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    model = saved_model(tmp_path)
    before = {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}

    def full_disk(obj, file):
        file.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    for step in (2, 3):  # replacing the same step, and a new one
        with pytest.raises(UserError, match=rf"could not write .*step-00000{step}: No space left on device \(.* free"):
            checkpoint.save_checkpoint(tmp_path / "checkpoints" / f"step-00000{step}", model, {}, {}, keep=1)
    after = {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
    assert after == before and not hidden_leftovers(tmp_path)


def test_what_a_kill_leaves_behind_is_loadable_and_tidied(tmp_path):
    """The states a SIGKILL can leave: a half-written .tmp folder, a checkpoint moved aside mid-replacement, a
    half-deleted .trash folder. The newest complete checkpoint is found; the next save cleans up."""
    model = saved_model(tmp_path, steps=3)
    folder = tmp_path / "checkpoints"
    (folder / "step-000003").rename(folder / ".old-step-000003")  # killed between the two renames of a re-save
    (folder / ".tmp-step-000004").mkdir()  # killed while writing step 4
    (folder / ".tmp-step-000004" / ADAPTER).write_bytes(b"half")
    (folder / "step-000001").rename(folder / ".trash-step-000001")  # killed while pruning step 1
    (folder / ".trash-step-000001" / ADAPTER).unlink()
    found = checkpoint.find_checkpoint(tmp_path)
    assert found == folder / ".old-step-000003"
    assert checkpoint.load_checkpoint(found, lora_model())["counters"]["step"] == 3
    checkpoint.save_checkpoint(folder / "step-000004", model, {"x": 1}, {}, keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["step-000003", "step-000004"]


def test_pruning_keeps_the_last_n_and_drops_a_stale_future(tmp_path):
    model = saved_model(tmp_path, steps=5)
    folder = tmp_path / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == [f"step-00000{s}" for s in range(1, 6)]
    checkpoint.save_checkpoint(folder / "step-000003", model, {"x": 1}, {}, keep=2)  # resumed from step 2
    assert sorted(p.name for p in folder.iterdir()) == ["step-000002", "step-000003"]


# ------------------------------------------------------------------------------------------------------- SIGKILL

KILL_CFG = TrainConfig(max_steps=32, lr=5e-3, batch_size=2, grad_accum=2, eval_every=4, save_every=1,
                       keep_checkpoints=2, pack_len=64)
# Deterministic kills inside saves: (where, n) = pause at the n-th such moment of the worker, then SIGKILL.
PAUSES = [
    ("writing", 2),  # torch.save of a checkpoint's trainer state: the temporary folder is half-written
    ("before_rename", 3),  # a complete, fsynced temporary folder not yet renamed into place
    ("moved_aside", 1),  # replacing a folder (adapter_best): the old copy moved aside, the new one not yet in
    ("pruning", 1),  # a pruned checkpoint renamed to .trash-, not yet deleted
    ("deleting", 3),  # a pruned checkpoint half deleted
]


def _install_pause(where: str, nth: int, pipe: int) -> None:
    """In a worker: at the nth ``where`` moment, tell the parent through ``pipe`` and wait to be killed."""
    seen = {"n": 0}

    def maybe_pause() -> None:
        seen["n"] += 1
        if seen["n"] == nth:
            os.write(pipe, b"!")
            time.sleep(600)

    rename, unlink, save = pathlib.Path.rename, os.unlink, torch.save

    def patched_rename(self, target):
        if where == "before_rename" and self.name.startswith(".tmp-"):
            maybe_pause()
        result = rename(self, target)
        if (where, Path(target).name[:5]) in (("moved_aside", ".old-"), ("pruning", ".tras")):
            maybe_pause()
        return result

    def patched_unlink(path, *args, **kwargs):
        unlink(path, *args, **kwargs)
        if where == "deleting":
            maybe_pause()

    def patched_save(obj, file, *args, **kwargs):  # in the loop only checkpoints' trainer states use torch.save
        if where == "writing":
            maybe_pause()
        return save(obj, file, *args, **kwargs)

    pathlib.Path.rename, os.unlink, torch.save = patched_rename, patched_unlink, patched_save


def _train_worker(run_dir: Path, cfg: TrainConfig) -> None:
    """A forked worker: resume the run in ``run_dir`` when it has a checkpoint, else start it."""
    try:
        resume = str(checkpoint.find_checkpoint(run_dir))
    except UserError:
        resume = None
    data, val = examples(24, seed=21), examples(6, seed=22)
    fit_sft(lora_model(), data, val, replace(cfg, resume=resume), run_dir=run_dir, show_progress=False)


def _paused_worker(where: str, nth: int, pipe: int, run_dir: Path) -> None:
    _install_pause(where, nth, pipe)
    _train_worker(run_dir, KILL_CFG)


def _fork(target, *args) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            target(*args)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _decode(status: int) -> str:
    if os.WIFSIGNALED(status):
        return "killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"
    return "done" if os.WEXITSTATUS(status) == 0 else f"exit {os.WEXITSTATUS(status)}"


def _status(pid: int) -> str:
    return _decode(os.waitpid(pid, 0)[1])


def _wait_for_pause(pid: int, pipe: int) -> str | None:
    """None once the worker says it paused; its exit status if it ended first."""
    while not select.select([pipe], [], [], 0.05)[0]:
        ended, status = os.waitpid(pid, os.WNOHANG)
        if ended:
            return _decode(status)
    return None


def kill_child(work: Path, kills: int, seed: int) -> None:
    """The kill test's child process: a reference run, then ``kills`` random SIGKILLs with the deterministic
    in-save ones in between, each followed by a resume, then a run to the end; writes ``report.json``."""
    torch.set_num_threads(1)
    import matplotlib.pyplot  # noqa: F401  (imported once here, not in every worker)

    report: dict = {"attempts": []}
    reference = _fork(_train_worker, work / "reference", replace(KILL_CFG, save_every=0))  # alongside the kills
    run, rng = work / "run", random.Random(seed)
    plan: list[tuple[str, float]] = [("random", rng.uniform(0.15, 0.9)) for _ in range(kills)]
    for i, pause in enumerate(PAUSES):  # right after the first random kill: steps are left to reach every pause
        plan.insert(1 + i, pause)
    for where, arg in plan:
        read_end, write_end = os.pipe()
        if where == "random":
            pid = _fork(_train_worker, run, KILL_CFG)
            time.sleep(arg)
            ended = None
        else:
            pid = _fork(_paused_worker, where, int(arg), write_end, run)
            ended = _wait_for_pause(pid, read_end)
        if ended is None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:  # a random delay longer than the rest of the run
                pass
        status = ended or _status(pid)
        os.close(read_end)
        os.close(write_end)
        try:
            latest = checkpoint.checkpoint_step(checkpoint.find_checkpoint(run))
        except UserError:
            latest = None
        report["attempts"].append({"where": where, "arg": arg, "paused": where != "random" and ended is None,
                                   "status": status, "leftovers": hidden_leftovers(run), "latest": latest})
    report["final"] = _status(_fork(_train_worker, run, KILL_CFG))
    report["reference"] = _status(reference)
    (work / "report.json").write_text(json.dumps(report, indent=1))


@pytest.mark.parametrize("kills", [6, pytest.param(20, marks=pytest.mark.slow)])
def test_sigkill_at_random_moments_and_inside_saves_then_resume_matches(tmp_path, kills):
    """``kills`` SIGKILLs at random moments plus one inside each phase of a save (PAUSES), each followed by a
    resume; the run then finishes with exactly the losses and weights of an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "tests.test_reliability", "kill-child", str(tmp_path), str(kills),
                           "0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    attempts = report["attempts"]
    assert report["reference"] == "done" and report["final"] == "done", done.stderr[-3000:]
    assert len([a for a in attempts if a["where"] == "random"]) == kills
    # every worker was either killed or finished; none failed to resume from what the previous kill left
    assert all(a["status"] in ("killed", "done") for a in attempts), (attempts, done.stderr[-3000:])
    assert all(a["paused"] for a in attempts if a["where"] != "random"), attempts  # each in-save kill happened
    assert all(a["leftovers"] for a in attempts if a["paused"]), attempts  # and cut a save short
    latest = [a["latest"] for a in attempts]
    first = next(i for i, step in enumerate(latest) if step is not None)
    # from the first save on there is always a checkpoint to resume from, and it never goes back
    assert all(a is not None and b is not None and a <= b for a, b in zip(latest[first:], latest[first + 1 :]))
    run, reference = tmp_path / "run", tmp_path / "reference"
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert train_losses(history) == train_losses(expected)
    assert_same_weights(run / "adapter", reference / "adapter")
    assert_same_weights(run / "adapter_best", reference / "adapter_best")
    summary, expected_summary = (json.loads((d / "summary.json").read_text()) for d in (run, reference))
    for key in ("steps", "tokens", "loss_tokens", "best_val_loss", "final_loss", "stopped"):
        assert summary[key] == expected_summary[key], key
    assert not hidden_leftovers(run)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000031", "step-000032"]


@pytest.mark.slow
def test_sigterm_to_the_script_exits_0_with_a_checkpoint_and_resume_goes_on(tmp_path):
    """End to end through scripts/train.py: SIGTERM mid-run -> exit code 0 and one line naming the checkpoint;
    --resume then continues from that step."""
    from tests.test_bad_input import script_argv, write_rows
    from tests.tiny import tiny_tokenizer

    model = tmp_path / "model"
    tiny_gemma3().save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    rows = [json.loads(line) for line in DEMO_FILE.read_text(encoding="utf-8").splitlines()][:6]
    data = write_rows(tmp_path / "data.jsonl", [{"article": r["article"], "highlights": r["highlights"]} for r in rows])
    run, cache = tmp_path / "run", tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    script = [sys.executable, str(ROOT / "scripts" / "train.py")]
    proc = subprocess.Popen([*script, *script_argv(model, data, run, cache, "--max-steps", "500")], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "step-000002").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    lines = [line for line in err.splitlines() if "checkpoint saved in" in line]  # the loop's events: stderr
    assert len(lines) == 1, err
    saved = checkpoint.find_checkpoint(run)
    assert f"stopped by signal at step {checkpoint.checkpoint_step(saved)}; checkpoint saved in {saved}" in lines[0]
    assert 2 <= checkpoint.checkpoint_step(saved) < 500
    steps = checkpoint.checkpoint_step(saved) + 1
    done = subprocess.run([*script, *script_argv(model, data, run, cache, "--resume", str(run), "--max-steps",
                                                 str(steps))], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resumed from {saved} at step {steps - 1}" in done.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == steps


if __name__ == "__main__" and sys.argv[1:2] == ["kill-child"]:
    kill_child(Path(sys.argv[2]), kills=int(sys.argv[3]), seed=int(sys.argv[4]))
