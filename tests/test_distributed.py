"""Data parallelism on the CPU: two gloo processes on loopback run the loop on a tiny Gemma 3.

Two ranks with accumulation A must follow the single-process run with accumulation 2A (the same windows, split
over ranks); resume under the same world size must be exact; a signal on one rank must stop both at the same step;
rank 0 alone writes. The ranks are started like torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT); run this file as ``python -m tests.test_distributed worker OUT`` to get one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gemma_lowmem.config import TrainConfig
from gemma_lowmem.distributed import close_distributed, current_ranks, init_distributed
from gemma_lowmem.errors import UserError
from gemma_lowmem.loss import sft_loss
from gemma_lowmem.tasks.summary_eval import DEMO_FILE
from tests.test_reliability import assert_same_weights, lora_model, train_losses
from tests.test_train import examples, fit_sft
from tests.tolerance import assert_as_accurate, fp64_copy

ROOT = Path(__file__).resolve().parents[1]
# fp32, not "auto": on a CPU with native bf16 (AVX-512, AMX) "auto" autocasts, and parameters one fp32 ulp apart
# (ranks sum gradients in another order) then round to different bf16 values.
DDP_CFG = TrainConfig(max_steps=6, lr=1e-2, batch_size=2, grad_accum=2, eval_every=2, save_every=2,
                      keep_checkpoints=5, pack_len=64, warmup_ratio=0.0, precision="fp32")
# (name, config changes, dropout): each run the worker does, in order
RUNS = [
    ("pack", {}, 0.0),
    ("bucket", {"packing": False}, 0.0),
    ("dropout", {}, 0.1),
    ("dropout-resumed", {"resume": "dropout/checkpoints/step-000002"}, 0.1),
    ("signal", {"save_every": 0}, 0.0),
]


def data() -> tuple[list[dict], list[dict]]:
    return examples(32, seed=31), examples(6, seed=32)  # 32 rows: whole rounds of micro-batches for 2 ranks


def sigterm_on_rank_1(model, batch):
    """sft_loss; rank 1 alone gets a SIGTERM in the middle of step 3's window (its 5th training micro-batch)."""
    sigterm_on_rank_1.calls += torch.is_grad_enabled()
    if current_ranks().rank == 1 and torch.is_grad_enabled() and sigterm_on_rank_1.calls == 5:
        os.kill(os.getpid(), signal.SIGTERM)
    return sft_loss(model, batch)


sigterm_on_rank_1.calls = 0


def worker(out: Path) -> None:
    """One rank: every run of RUNS, then a JSON line of results per run in ``out/rank<r>.json``."""
    torch.set_num_threads(1)
    ranks = init_distributed()
    train, val = data()
    results = {}
    for name, changes, dropout in RUNS:
        if "resume" in changes:
            changes = {**changes, "resume": str(out / changes["resume"])}
        model = lora_model(dropout=dropout)
        result = fit_sft(model, train, val, replace(DDP_CFG, **changes), run_dir=out / name, show_progress=False,
                         loss_fn=sigterm_on_rank_1 if name == "signal" else None)
        torch.save({k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad},
                   out / f"{name}-rank{ranks.rank}.pt")
        results[name] = {"stopped": result.stopped, "steps": result.steps, "tokens": result.tokens,
                         "history": len(result.history)}
    (out / f"rank{ranks.rank}.json").write_text(json.dumps(results))
    # Leave the group as scripts/train.py does: a gloo group still up at interpreter exit once ended a rank with
    # "terminate called without an active exception" (exit code 134) after all its work was done.
    close_distributed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Run the two gloo ranks once (they do every run of RUNS) and return their output folder."""
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.test_distributed", "worker", str(out)], cwd=ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return out


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


def lora_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("name", ["pack", "bucket"])
def test_two_ranks_equal_one_process_with_twice_the_accumulation(two_ranks, tmp_path, name):
    changes = dict(next(c for n, c, _ in RUNS if n == name))
    train, val = data()
    cfg = replace(DDP_CFG, grad_accum=2 * DDP_CFG.grad_accum, **changes)
    model = lora_model(dropout=0.0)
    single = fit_sft(model, train, val, cfg, run_dir=tmp_path / "fp32", show_progress=False)
    gold_model = fp64_copy(lora_model(dropout=0.0))
    gold = fit_sft(gold_model, train, val, cfg, run_dir=tmp_path / "fp64", show_progress=False)
    ddp_history = [json.loads(line) for line in (two_ranks / name / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ddp_history] == [r["step"] for r in single.history]  # rank 0's records only
    # Two ranks sum each window's gradients in another order than one process, and Adam carries that through the
    # steps: the two-rank run may be a small factor worse than the one-process run, both against the fp64 run.
    # The gradient norm too: Adam would hide gradients off by a constant factor from the losses.
    for key in ("loss", "val_loss", "grad_norm"):
        assert [key in r for r in ddp_history] == [key in r for r in single.history] == [key in r for r in gold.history]
        ddp, one, fp64 = ([r[key] for r in h if key in r] for h in (ddp_history, single.history, gold.history))
        assert_as_accurate(torch.tensor(ddp), torch.tensor(one), torch.tensor(fp64, dtype=torch.float64), name=key)
    rank0, rank1 = (lora_state(two_ranks / f"{name}-rank{r}.pt") for r in range(2))
    lora = {key: value.detach() for key, value in model.named_parameters() if value.requires_grad}
    for key in lora:
        assert torch.equal(rank0[key], rank1[key]), key  # DDP keeps the replicas identical
    gold_lora = {key: value.detach() for key, value in gold_model.named_parameters() if value.requires_grad}
    assert_as_accurate({key: rank0[key] for key in lora}, lora, gold_lora, per_tensor=False, name="weights")
    results = json.loads((two_ranks / "rank0.json").read_text())[name]
    assert results["tokens"] == single.tokens  # token counts are summed over ranks


def test_resume_with_the_same_world_size_is_exact(two_ranks):
    full = [json.loads(line) for line in (two_ranks / "dropout" / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (two_ranks / "dropout-resumed" / "metrics.jsonl").read_text().splitlines()]
    assert train_losses(resumed) == [r for r in train_losses(full) if r[0] > 2]
    assert_same_weights(two_ranks / "dropout-resumed" / "adapter", two_ranks / "dropout" / "adapter")
    for r in range(2):  # every rank's dropout RNG came back, not only rank 0's
        a, b = (lora_state(two_ranks / f"{name}-rank{r}.pt") for name in ("dropout", "dropout-resumed"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_signal_on_one_rank_stops_both_at_the_same_step(two_ranks):
    results = [json.loads((two_ranks / f"rank{r}.json").read_text())["signal"] for r in range(2)]
    assert [(r["stopped"], r["steps"]) for r in results] == [("signal", 3), ("signal", 3)]
    assert (two_ranks / "signal" / "checkpoints" / "step-000003" / "trainer_state.pt").is_file()


def test_rank_0_alone_writes(two_ranks):
    results = [json.loads((two_ranks / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["history"] == 0 for r in results[1].values())  # rank 1 neither writes nor reads the log
    assert not list(two_ranks.rglob(".*-*"))  # no two writers racing on a temporary folder
    state = torch.load(two_ranks / "pack" / "checkpoints" / "step-000006" / "trainer_state.pt", weights_only=False)
    assert len(state["rng"]) == 2 and state["plan"]["world_size"] == 2


def test_resume_with_another_world_size_is_refused(two_ranks, tmp_path):
    train, val = data()
    cfg = replace(DDP_CFG, resume=str(two_ranks / "pack"))
    with pytest.raises(UserError, match="world_size was 2, now 1"):
        fit_sft(lora_model(dropout=0.0), train, val, cfg, run_dir=tmp_path, show_progress=False)


@pytest.mark.slow
def test_torchrun_runs_the_training_script_data_parallel(tmp_path):
    """``torchrun --nproc-per-node 2 scripts/train.py`` on the CPU (gloo): one run folder written by rank 0, the
    same losses as one process with twice the accumulation, and ``--resume`` under torchrun."""
    from tests.test_bad_input import script_argv, write_rows
    from tests.tiny import tiny_gemma3, tiny_tokenizer

    model = tmp_path / "model"
    tiny_gemma3().save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    rows = [json.loads(line) for line in DEMO_FILE.read_text(encoding="utf-8").splitlines()][:8]
    data = write_rows(tmp_path / "data.jsonl", [{"article": r["article"], "highlights": r["highlights"]} for r in rows])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(free_port()), str(ROOT / "scripts" / "train.py")]
    script = [sys.executable, str(ROOT / "scripts" / "train.py")]

    def run(command: list[str], folder: str, *extra: str) -> list[dict]:
        argv = script_argv(model, data, tmp_path / folder, tmp_path / "cache", "--lora-dropout", "0",
                           "--max-steps", "3", "--precision", "fp32", *extra)  # fp32: see DDP_CFG
        done = subprocess.run([*command, *argv], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return [json.loads(line) for line in (tmp_path / folder / "metrics.jsonl").read_text().splitlines()]

    ddp = run(torchrun, "ddp", "--batch-size", "1", "--grad-accum", "1")
    one = run(script, "one", "--batch-size", "1", "--grad-accum", "2")
    keys = ("loss", "val_loss", "grad_norm")
    assert [r["step"] for r in ddp] == [r["step"] for r in one] == [1, 2, 3, 3]
    for a, b in zip(ddp, one):
        assert [a.get(k) for k in keys] == pytest.approx([b.get(k) for k in keys], rel=1e-5, abs=1e-6)
    resumed = run(torchrun, "ddp", "--batch-size", "1", "--grad-accum", "1", "--resume", str(tmp_path / "ddp"),
                  "--max-steps", "4")
    assert [r["step"] for r in resumed] == [1, 2, 3, 3, 4, 4]
    state = torch.load(tmp_path / "ddp" / "checkpoints" / "step-000004" / "trainer_state.pt", weights_only=False)
    assert state["plan"]["world_size"] == 2


if __name__ == "__main__" and sys.argv[1:2] == ["worker"]:
    worker(Path(sys.argv[2]))
