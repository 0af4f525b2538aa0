"""benchmarks/bench_train.py: both recipes end to end on a tiny random model, the FLOP count, the table, bad flags."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from gemma_lowmem.config import LoraConfig
from gemma_lowmem.tasks.summary_eval import DEMO_FILE
from tests.tiny import SPECIAL, VOCAB, tiny_gemma3

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
RESULT_KEYS = {
    "variant", "recipe", "switches", "batch_size", "grad_accum", "steps", "conversations", "seconds", "loss_tokens",
    "tokens", "slots", "loss_tokens_per_s", "tokens_per_s", "padding_fraction", "packing_efficiency",
    "peak_memory_bytes", "model_flops", "hardware_flops", "shape", "final_loss", "data_sha", "threads",
    "compute_dtype",
}


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_train", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def word_tokenizer():
    """A word-level tokenizer over the demo set's most frequent words (others map to <unk>).

    Byte-level tokens would make each conversation ~2,300 tokens long; words keep it near 500 and the test fast.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    counts = Counter(re.findall(r"\w+|[^\w\s]", DEMO_FILE.read_text(encoding="utf-8")))
    words = [w for w, _ in counts.most_common(VOCAB - len(SPECIAL)) if w not in SPECIAL]
    backend = Tokenizer(models.WordLevel({tok: i for i, tok in enumerate(SPECIAL + words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
    )


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    tiny_gemma3(max_position_embeddings=2048).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def test_hf_and_ours_run_two_steps_on_the_same_tokens(tiny_model_dir, tmp_path):
    settings = bench.Settings(
        model=str(tiny_model_dir), data=str(DEMO_FILE), steps=2, grad_accum=1, max_seq_length=1024, lang="en",
        max_article_length=300, eval_conversations=2, threads=1, cache_dir=str(tmp_path / "tokens"),
    )
    # One thread: on a busy machine two threads wait on each other at every op (measured 10x slower here).
    threads = torch.get_num_threads()
    try:
        results = {name: bench.run_variant(name, settings) for name in ("hf", "ours")}
    finally:
        torch.set_num_threads(threads)  # run_variant sets the process's threads; later tests expect the default
    for name, result in results.items():
        assert RESULT_KEYS <= result.keys(), RESULT_KEYS - result.keys()
        assert result["variant"] == name
        assert result["conversations"] == 4  # steps x 2 x grad_accum
        assert result["seconds"] > 0 and result["peak_memory_bytes"] > 0
        assert 0 < result["loss_tokens"] < result["tokens"] <= result["slots"]
        assert result["model_flops"] > 0 and result["hardware_flops"] > result["model_flops"]
        assert result["final_loss"] > 0
    hf, ours = results["hf"], results["ours"]
    assert hf["data_sha"] == ours["data_sha"]
    assert (hf["loss_tokens"], hf["tokens"]) == (ours["loss_tokens"], ours["tokens"])
    assert hf["steps"] == 2 and hf["packing_efficiency"] is None
    assert 0 < ours["packing_efficiency"] <= 1
    assert ours["switches"] == {"packing": True, "bucketing": True, "chunked_loss": True,
                                "gradient_checkpointing": True, "lora_dropout": LoraConfig().dropout,
                                "float_weights": True}  # the plan's: the tiny model's copies fit 8 GB


def test_attended_pairs_counts_causal_and_windowed_keys():
    # length 3: full attention sees 1 + 2 + 3 keys; a window of 2 sees 1 + 2 + 2
    assert bench.attended_pairs([3], (None,)) == 6
    assert bench.attended_pairs([3], (2,)) == 5
    assert bench.attended_pairs([3, 1], (None, 2)) == 6 + 5 + 1 + 1
    assert bench.attended_pairs([2], (4,)) == 3  # a window longer than the conversation changes nothing


def test_count_flops_follows_the_stated_formula():
    shape = bench.ModelShape(n_linear=100, n_lora=10, hidden=4, vocab=50, attn_width=8, windows=(None,))
    model, hardware = bench.count_flops(shape, tokens=7, loss_tokens=3, head_positions=3, pairs=20,
                                        checkpointing=True, chunked=True)
    assert model == (400 + 60) * 7 + 12 * 8 * 20 + 4 * 4 * 50 * 3
    assert hardware == model + (200 + 20) * 7 + 4 * 8 * 20 + 2 * 4 * 50 * 3
    plain = bench.count_flops(shape, tokens=7, loss_tokens=3, head_positions=9, pairs=20, checkpointing=False,
                              chunked=False)
    assert plain[0] == plain[1] == (400 + 60) * 7 + 12 * 8 * 20 + 4 * 4 * 50 * 9


@pytest.mark.parametrize(("micro", "steps", "accum"), [(12, 4, 3), (7, 3, 7), (8, 8, 1), (5, 1, 5)])
def test_pick_grad_accum_divides_the_epoch(micro, steps, accum):
    assert bench.pick_grad_accum(micro, steps) == accum


def _report(ours_peak: int, ours_speed: float) -> dict:
    row = {"loss_tokens_per_s": 10.0, "tokens_per_s": 50.0, "padding_fraction": 0.07, "packing_efficiency": None,
           "peak_memory_bytes": 8 * 2**30, "mfu": 0.1, "hfu": 0.15, "final_loss": 1.5, "steps": 10, "seconds": 60.0}
    ours = {**row, "packing_efficiency": 0.955, "peak_memory_bytes": ours_peak, "loss_tokens_per_s": ours_speed}
    return {"variants": {"hf": row, "ours": ours, "no-packing": {"error": "exit code 137"}},
            "matmul": {"flops_per_s": 5e10, "dtype": "float32", "size": 2048, "before": 5e10, "after": 4e10},
            "threads": 2, "same_tokens": "yes"}


def test_table_ends_with_the_ratio_line():
    table = bench.render_table(_report(2 * 2**30, 35.0))
    assert table.splitlines()[-1] == "ours/hf: peak_mem=0.250 loss_tokens_per_s=3.50"
    assert "| no-packing | failed: exit code 137 |" in table
    assert "| ours | 35.0 | 50.0 | 7.0% | 95.5% | 2.00 |" in table


def test_missing_data_is_one_line_and_exit_2(tmp_path):
    missing = tmp_path / "nope.jsonl"
    proc = subprocess.run([sys.executable, str(BENCH), "--data", str(missing)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --data") and str(missing) in lines[0], proc.stderr


def test_gpu_check_runs_every_check_on_the_cpu_in_smoke_mode():
    import json
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    out = subprocess.run([sys.executable, str(script), "--cpu-smoke"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    records = [json.loads(line) for line in out.stdout.splitlines()]  # stdout holds JSON lines only; logs: stderr
    checks = [r["check"] for r in records]
    assert checks[0] == "precision" and checks.count("e2b") == 2 and checks[-1] == "hf-recipe"
    assert {r["precision"] for r in records if r["check"] == "gemma3"} >= {"fp16", "fp32"}
    assert all(r["finite"] for r in records if r["check"] == "gemma3")
    assert all(r["load_peak_gib"] > 0 and r["predicted_step_gib"] > 0 for r in records if r["check"] == "e2b")
