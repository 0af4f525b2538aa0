"""Memory: size parsing, the planner (weights, monotonicity, accumulation, refusals), the plan script, PeakMemory."""

from __future__ import annotations

import runpy
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from gemma_lowmem import memory
from gemma_lowmem.cli import run_script
from gemma_lowmem.config import LoraConfig, RunConfig, TrainConfig
from gemma_lowmem.errors import UserError
from gemma_lowmem.memory import (
    BudgetTooSmall,
    GiB,
    PeakMemory,
    WeightsExceedBudget,
    enforce_cap,
    free_bytes,
    is_oom,
    parse_size,
)
from gemma_lowmem.planner import (
    FLOAT_COPIES,
    PLANNED,
    StepSpec,
    describe_model,
    fixed_bytes,
    load_model_config,
    plan_memory,
    plan_run,
    predict_peak,
)
from gemma_lowmem.tasks import get_task
from tests.tiny import gemma3_config

ROOT = Path(__file__).resolve().parents[1]
TARGETS = LoraConfig().target_modules


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GB", 8 * 10**9),
        ("8GiB", 8 * 2**30),
        ("7.5G", 7.5 * 10**9),
        ("8000MB", 8 * 10**9),
        (" 512 mib ", 512 * 2**20),
        ("1.5TB", 1.5 * 10**12),
        ("4096", 4096),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == int(expected)


@pytest.mark.parametrize("text", ["", "GB", "eight GB", "8XB", "-1GB", "0GB", "8 G B", "1e9"])
def test_parse_size_rejects(text):
    with pytest.raises(UserError, match="--max-mem"):
        parse_size(text)


def test_describe_model_counts_weights_and_lora_by_hand():
    cfg = gemma3_config(layers=2)  # hidden 64, MLP 128, 4 heads x 16, 2 KV heads, vocab 1000, tied head
    shape = describe_model(cfg, quant="int8", dtype_bytes=2, lora_r=4, lora_targets=["q_proj", "down_proj"])
    h, i, q, kv = 64, 128, 64, 32
    per_layer = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
                 "up_proj": (h, i), "down_proj": (i, h)}
    int8 = 2 * sum(n_in * n_out + 4 * n_out for n_in, n_out in per_layer.values())  # 1 byte + fp32 row scale
    assert shape.weight_bytes["quantized linears"] == int8
    assert shape.weight_bytes["embedding and head"] == 1000 * (64 + 4)  # tied, int8 rows: counted once
    assert shape.lora_params == 2 * 4 * ((h + q) + (i + h))
    unquantized = describe_model(cfg, quant="none", dtype_bytes=4, embeddings="float")
    assert sum(unquantized.weight_bytes.values()) == 4 * sum(p.numel() for p in _meta_model(cfg).parameters())


def _meta_model(cfg):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


@pytest.fixture(scope="module")
def e2b():
    return load_model_config("gemma-3n-e2b")


def test_shipped_e2b_config_has_the_published_size(e2b):
    model = _meta_model(e2b)
    assert sum(p.numel() for p in model.parameters()) == 4_435_182_688
    assert model.model.embed_tokens_per_layer.weight.shape == (262_144, 30 * 256)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert (e2b.hidden_size, e2b.num_hidden_layers, e2b.num_key_value_heads, e2b.head_dim) == (2048, 30, 2, 256)
    assert e2b.layer_types.count("full_attention") == 6 and e2b.final_logit_softcapping == 30.0
    shape = describe_model(e2b, quant="int8", dtype_bytes=2, embeddings="int8", lora_r=16, lora_targets=TARGETS)
    # the big tables as row-wise int8: one byte per element and an fp32 scale per row (the tied head counted once)
    assert shape.weight_bytes["per-layer embedding"] == 262_144 * (7680 + 4)
    assert shape.weight_bytes["embedding and head"] == 262_400 * (2048 + 4)
    assert shape.stream == 4 * 2048
    on_disk = describe_model(e2b, quant="int8", dtype_bytes=2, embeddings="disk")
    assert on_disk.weight_bytes["per-layer embedding"] == 262_144 * 4  # mapped: only the scales are resident
    floats = describe_model(e2b, quant="int8", dtype_bytes=2, embeddings="float")
    assert floats.weight_bytes["embedding and head"] == 262_400 * 2048 * 2
    assert shape.int8_head and not floats.int8_head  # the loss walks the int8 head in vocabulary blocks


SMALL = dict(layers=4, hidden_size=256, intermediate_size=1024)
SHAPE = describe_model(gemma3_config(**SMALL), quant="int8", dtype_bytes=4, lora_r=16, lora_targets=TARGETS)


def _peak(batch: int, checkpointing: bool, chunk: int | None, seq: int = 512) -> int:
    return sum(predict_peak(SHAPE, StepSpec(batch, seq, checkpointing, chunk), "cpu").values())


def _plan(budget: float, max_seq_length: int = 512, global_batch_tokens: int = 8 * 512):
    return plan_memory(SHAPE, budget=int(budget), step=StepSpec(1, max_seq_length),
                       global_batch_tokens=global_batch_tokens, device_type="cpu")


def test_plan_fits_its_budget_and_grows_with_it():
    least, most = _peak(1, True, 16), _peak(8, False, None)  # the smallest and the fastest plans
    budgets = [least + f * (most - least) for f in (0.0, 0.05, 0.2, 0.5, 0.8, 1.0)] + [2 * most]
    plans = [_plan(b) for b in budgets]
    for budget, plan in zip(budgets, plans):
        assert plan.predicted_peak <= budget
        assert plan.predicted_peak == sum(plan.breakdown.values())
    speed = [(not p.gradient_checkpointing, p.batch_size) for p in plans]
    assert speed == sorted(speed), "more memory must never give a slower plan"
    assert (plans[0].gradient_checkpointing, plans[0].batch_size) == (True, 1)
    assert (plans[-1].gradient_checkpointing, plans[-1].batch_size, plans[-1].loss_chunk_size) == (False, 8, None)


@pytest.mark.parametrize(("seq", "global_tokens", "rows"), [(512, 4096, 8), (512, 5000, 10), (512, 3584, 7),
                                                           (1024, 100, 1)])
def test_accumulation_reaches_the_global_batch(seq, global_tokens, rows):
    least, most = _peak(1, True, 16, seq), _peak(16, False, None, seq)
    for budget in (least, (least + most) / 2, 2 * most):
        plan = _plan(budget, max_seq_length=seq, global_batch_tokens=global_tokens)
        assert plan.batch_size * plan.grad_accum == rows


def test_weights_over_budget_name_the_needed_size(e2b):
    with pytest.raises(WeightsExceedBudget, match=r"needs at least \d+\.\d\d GiB") as err:
        plan_memory(describe_model(e2b, quant="int8", dtype_bytes=2, lora_r=16, lora_targets=TARGETS),
                    budget=parse_size("4GB"), step=StepSpec(1, 2048), global_batch_tokens=16384,
                    device_type="cpu")
    assert err.value.needed > parse_size("4GB")
    assert isinstance(err.value, UserError)


def test_budget_that_fits_weights_but_no_row_is_refused():
    fixed = fixed_bytes(SHAPE, "cpu")
    budget = fixed + 2**20  # the weights fit, a 32k-token row does not
    with pytest.raises(BudgetTooSmall, match="smaller --max-seq-length") as err:
        _plan(budget, max_seq_length=32768, global_batch_tokens=32768)
    assert not isinstance(err.value, WeightsExceedBudget)
    assert err.value.needed == _peak(1, True, 16, 32768) > budget
    with pytest.raises(WeightsExceedBudget):
        _plan(fixed - 2**20)


def test_prediction_grows_with_tokens_and_without_checkpointing():
    peaks = [_peak(b, True, None) for b in (1, 2, 4)]
    assert peaks[0] < peaks[1] < peaks[2]
    assert _peak(4, False, None) > peaks[-1]
    assert _peak(4, True, 16) <= peaks[-1]
    pairs = predict_peak(SHAPE, StepSpec(4, 512, True, None, task_factor=2.0), "cpu")
    assert sum(pairs.values()) > peaks[-1]
    assert get_task("preference").activation_factor == 2.0 and get_task("summary_eval").activation_factor == 1


def test_plan_apply_and_table():
    plan = _plan(_peak(2, True, None))
    cfg = RunConfig()
    applied = plan.apply(cfg)
    assert (applied.train.batch_size, applied.train.grad_accum) == (plan.batch_size, plan.grad_accum)
    assert applied.train.gradient_checkpointing == plan.gradient_checkpointing
    assert applied.train.loss_chunk_size == plan.loss_chunk_size
    assert cfg == RunConfig() and applied.model == cfg.model  # a copy; the rest untouched
    table = plan.table()
    for part in plan.breakdown:
        assert part in table
    assert "predicted peak" in table and "grad_accum" in table
    assert replace(plan, batch_size=3).table() != table


def test_is_oom_and_no_cap_on_the_cpu():
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_oom(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert enforce_cap(GiB, torch.device("cpu")) is None


def test_free_bytes_within_the_device_the_cap_and_the_budget(monkeypatch):
    """CPU: MemAvailable, and no more than the budget less the resident size; CUDA (simulated): free plus the
    allocator's cached blocks, within the cap, and the budget less what is allocated."""
    cpu = torch.device("cpu")
    assert 0 < free_bytes(cpu) < 2**50  # this machine's real reading
    kib = {"MemAvailable": 10 * 2**20, "VmRSS": 2 * 2**20}  # 10 GiB available, 2 GiB resident
    monkeypatch.setattr(memory, "_status_kib", lambda field, path="/proc/self/status": kib[field])
    assert free_bytes(cpu) == 10 * GiB
    assert free_bytes(cpu, budget=5 * GiB) == 3 * GiB
    assert free_bytes(cpu, budget=1 * GiB) == 0
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * GiB, 16 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 5 * GiB)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 6 * GiB)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0)
    assert free_bytes(gpu) == 5 * GiB  # 4 free on the device + 1 cached in the allocator
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 0.5)
    assert free_bytes(gpu) == 3 * GiB  # the cap (8 GiB) less the 5 allocated
    assert free_bytes(gpu, budget=7 * GiB) == 2 * GiB


def test_load_model_config_errors(tmp_path):
    with pytest.raises(UserError, match="no such file or folder"):
        load_model_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "config.json"
    bad.write_text('{"hidden_size": 8}')
    with pytest.raises(UserError, match="no model_type"):
        load_model_config(str(bad))
    bad.write_text("{not json")
    with pytest.raises(UserError, match="cannot read a model config"):
        load_model_config(str(bad))


def _run_plan_script(args: list[str], monkeypatch) -> None:
    script = runpy.run_path(str(ROOT / "scripts" / "plan_memory.py"), run_name="plan_memory")
    monkeypatch.setattr(sys, "argv", ["plan_memory.py", *args])
    run_script(script["main"])


def test_plan_script_end_to_end_on_the_shipped_config(monkeypatch, capsys):
    _run_plan_script(["--model", "gemma-3n-e2b", "--max-mem", "24GB", "--device", "cpu", "--dtype", "fp32",
                      "--precision", "fp32"], monkeypatch)
    out = capsys.readouterr().out
    assert "30 layers, hidden 2048, vocab 262400" in out
    assert "predicted peak" in out and "per-layer embedding" in out and "grad_accum" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "gemma-3n-e2b", "--max-mem", "8XB"], "error: --max-mem '8XB' is not a size"),
        (["--model", "gemma-3n-e2b", "--max-mem", "3GB", "--device", "cpu"], "needs at least"),
        (["--model", "./no/such/model"], "no such file or folder"),
        (["--model", "gemma-3n-e2b", "--max-seq-length", "0"], "max_seq_length=0 must be > 0"),
    ],
)
def test_plan_script_bad_input_is_one_line_and_exit_2(args, message, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_:
        _run_plan_script(args, monkeypatch)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and message in err and len(err.splitlines()) == 1


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_peak_memory_reset_and_read_on_cpu():
    memory = PeakMemory(torch.device("cpu"))
    memory.reset()
    before = memory.peak()
    block = torch.ones(300 * 2**20 // 4)  # 300 MiB, touched
    grown = memory.read()["peak_rss"]
    del block  # a block this large is returned to the OS at once
    assert grown - before > 250 * 2**20
    # the high-water mark stays after the free (the kernel updates it lazily: a few pages of slack)...
    assert memory.peak() > grown - 8 * 2**20
    memory.reset()
    assert memory.peak() < grown - 250 * 2**20  # ...until a new phase starts


def test_plan_run_chooses_what_was_not_given_and_keeps_what_was():
    cpu, config = torch.device("cpu"), gemma3_config()
    cfg = RunConfig(train=TrainConfig(max_mem="64GB", batch_size=2, grad_accum=4, gradient_checkpointing=True))
    free = plan_run(cfg, config, cpu)  # plenty of memory: no recompute, the whole global batch in one micro-batch
    assert (free.batch_size, free.grad_accum, free.gradient_checkpointing) == (8, 1, False)
    kept = plan_run(cfg, config, cpu, keep={"grad_accum", "gradient_checkpointing"})  # batch split kept as a pair
    assert (kept.batch_size, kept.grad_accum, kept.gradient_checkpointing) == (2, 4, True)
    applied = kept.apply(cfg).train
    assert (applied.batch_size, applied.grad_accum, applied.gradient_checkpointing) == (2, 4, True)
    # a budget below what the given settings need, above what the planner's own choice needs
    given = replace(cfg, train=replace(cfg.train, batch_size=8, grad_accum=1, gradient_checkpointing=False,
                                       float_weights=False))
    need = plan_run(given, config, cpu, keep=PLANNED).predicted_peak
    tight = replace(given, train=replace(given.train, max_mem=str(need - 1)))
    with pytest.raises(BudgetTooSmall, match="batch_size=8.*leave them out"):
        plan_run(tight, config, cpu, keep=PLANNED)
    chosen = plan_run(tight, config, cpu)
    assert chosen.predicted_peak <= need - 1 and chosen.batch_size * chosen.grad_accum == 8


E2B = "gemma-3n-e2b"


def _e2b_on_a_simulated_t4(monkeypatch, **model: bool):
    from gemma_lowmem.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from gemma_lowmem.planner import load_model_config, plan_run

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    config = load_model_config(E2B)
    config.dtype = torch.bfloat16  # as the hub checkpoint stores it
    cfg = RunConfig(model=ModelConfig(model=E2B, **model), data=DataConfig(max_seq_length=2048),
                    train=TrainConfig(max_mem="8GB", batch_size=1, grad_accum=1))
    return plan_run(cfg, config, torch.device("cuda", 0))


@pytest.mark.parametrize("on_cpu, on_disk", [(True, False), (False, True)],
                         ids=["embeddings-on-cpu", "embeddings-on-disk"])
def test_e2b_loads_and_trains_inside_8gb_on_a_simulated_t4(monkeypatch, on_cpu, on_disk):
    """The Gemma 3n E2B text model built on the meta device, planned for a T4 (fp16 autocast, fp32 float weights,
    a bf16 checkpoint) with its per-layer table off the GPU: the load peak (from the shapes) and the step's are
    under the 7.45 GiB of --max-mem 8GB."""
    plan = _e2b_on_a_simulated_t4(monkeypatch, embeddings_on_cpu=on_cpu, embeddings_on_disk=on_disk)
    assert 0 < plan.load_peak < 7.45 * GiB
    assert plan.predicted_peak <= plan.budget
    # before: the fp16 per-layer table (3.75 GiB) loaded onto the GPU and its int8 copy (1.9 GiB) made beside it
    per_layer_float = 262_144 * 7_680 * 2
    assert plan.load_peak < sum(plan.breakdown[k] for k in plan.breakdown if "embedding" not in k) + per_layer_float


def test_e2b_whose_step_breaks_8gb_with_its_per_layer_table_on_a_gpu_is_planned_with_the_table_on_the_cpu(
        monkeypatch):
    """Measured on an H200: 7.545 GiB reserved for this step with the table on the GPU, over the 7.45 GiB of 8 GB
    (predicted 7.93 GiB); with the table on the CPU 5.686 GiB. The planner moves the table when the user did not."""
    from gemma_lowmem.config import ModelConfig, RunConfig

    plan = _e2b_on_a_simulated_t4(monkeypatch)
    assert plan.embeddings_on_cpu and plan.predicted_peak <= plan.budget
    assert plan.breakdown.get("per-layer embedding", 0) <= 262_144 * 4  # its row scales alone
    assert "on the CPU" in plan.table()
    cfg = RunConfig(model=ModelConfig(model=E2B))
    assert plan.apply(cfg).model.embeddings_on_cpu and not cfg.model.embeddings_on_cpu


def test_a_load_that_cannot_fit_stops_before_loading_naming_the_budget():
    from gemma_lowmem.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from gemma_lowmem.memory import BudgetTooSmall
    from gemma_lowmem.planner import load_model_config, plan_run

    config = load_model_config(E2B)
    config.dtype = torch.bfloat16
    cfg = RunConfig(model=ModelConfig(model=E2B), data=DataConfig(max_seq_length=512),
                    train=TrainConfig(max_mem="7GB", batch_size=1, grad_accum=1, precision="fp32"))
    with pytest.raises(BudgetTooSmall, match=r"loading gemma-3n-e2b peaks at .* give --max-mem \d+\.\dGB") as err:
        plan_run(cfg, config, torch.device("cpu"))
    assert err.value.needed > 7e9


def test_float_copies_of_the_int8_linears_are_kept_where_they_fit_beside_the_plan():
    copies = SHAPE.int8_linear_elements * 4
    assert copies > 0 and describe_model(gemma3_config(**SMALL), quant="none", dtype_bytes=4).int8_linear_elements == 0

    def plan(budget: float, **fixed):
        return plan_memory(SHAPE, budget=int(budget), step=StepSpec(1, 512), global_batch_tokens=8 * 512,
                           device_type="cpu", fixed=fixed, float_copy_bytes=copies)

    without = _plan(_peak(8, False, None))  # the fastest plan, just fitting
    roomy = plan(without.predicted_peak + copies)
    assert roomy.float_weights and roomy.breakdown[FLOAT_COPIES] == copies
    assert roomy.predicted_peak == without.predicted_peak + copies == sum(roomy.breakdown.values())
    assert (roomy.batch_size, roomy.gradient_checkpointing) == (without.batch_size, without.gradient_checkpointing)
    assert "float copies kept" in roomy.table() and roomy.apply(RunConfig()).train.float_weights
    tight = plan(without.predicted_peak + copies - 1)  # the copies come last: the step's layout is not given up
    assert not tight.float_weights and FLOAT_COPIES not in tight.breakdown
    assert (tight.batch_size, tight.gradient_checkpointing) == (without.batch_size, without.gradient_checkpointing)
    assert "dequantized at every use" in tight.table() and tight.apply(RunConfig()).train.float_weights is False
    given = plan(without.predicted_peak + copies - 1, float_weights=True)  # kept: the step is made smaller instead
    assert given.float_weights and given.predicted_peak <= without.predicted_peak + copies - 1
    assert not plan(10 * without.predicted_peak, float_weights=False).float_weights
    with pytest.raises(BudgetTooSmall, match="float_weights=True"):
        plan(_peak(1, True, 16) + copies - 1, float_weights=True)


def test_plan_run_sizes_the_copies_in_the_matmuls_dtype():
    from gemma_lowmem.device import resolve_precision

    cpu, config = torch.device("cpu"), gemma3_config(**SMALL)
    cfg = RunConfig(train=TrainConfig(max_mem="64GB"))
    plan = plan_run(cfg, config, cpu)
    compute = resolve_precision(cpu, "auto").dtype or torch.float32
    assert plan.float_copy_bytes == SHAPE.int8_linear_elements * compute.itemsize and plan.float_weights
    assert not plan_run(replace(cfg, model=replace(cfg.model, quant="none")), config, cpu).float_copy_bytes
