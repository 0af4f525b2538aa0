"""Precision on every device class, with the GPU classes simulated (patched device properties) on the CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gemma_lowmem.config import LoraConfig, ModelConfig, TrainConfig
from gemma_lowmem.device import bf16_supported, resolve_precision, weight_dtype
from gemma_lowmem.errors import UserError
from gemma_lowmem.loss import sft_loss
from gemma_lowmem.model import add_lora, device_map_for, load_base_model
from tests.tiny import tiny_gemma3, tiny_gemma3n, tiny_tokenizer

CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu(monkeypatch):
    """Simulate a GPU of a given compute capability: ``gpu(7, 5)`` is a T4, ``gpu(8, 0)`` an A100."""

    def simulate(major: int, minor: int, name: str = "simulated GPU") -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        # what a T4 answers by default (emulation counts): the check must not rely on it
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)

    return simulate


@pytest.mark.parametrize("major, minor", [(7, 5), (7, 0), (6, 1)])
def test_gpus_without_native_bf16_train_fp16_with_a_scaler_and_fp32_weights(gpu, major, minor):
    gpu(major, minor, "Tesla T4")
    precision = resolve_precision(CUDA)
    assert not bf16_supported(CUDA)
    assert (precision.dtype, precision.use_scaler) == (torch.float16, True)
    assert weight_dtype(CUDA) == torch.float32  # fp16 weights overflow Gemma's residual stream
    with pytest.raises(UserError, match="compute capability 8.0 or newer.*has 7.5|has 7.0|has 6.1"):
        resolve_precision(CUDA, "bf16")


@pytest.mark.parametrize("major, minor", [(8, 0), (8, 6), (9, 0)])
def test_ampere_and_newer_train_bf16_without_a_scaler(gpu, major, minor):
    gpu(major, minor)
    precision = resolve_precision(CUDA)
    assert (precision.dtype, precision.use_scaler) == (torch.bfloat16, False)
    assert weight_dtype(CUDA) == torch.bfloat16


@pytest.mark.parametrize("native, autocast, weights", [(True, torch.bfloat16, torch.bfloat16),
                                                       (False, None, torch.float32)])
def test_cpus_use_bf16_only_where_native(monkeypatch, native, autocast, weights):
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: native)
    cpu = torch.device("cpu")
    precision = resolve_precision(cpu)
    assert (precision.dtype, precision.use_scaler) == (autocast, False)
    assert weight_dtype(cpu) == weights


@pytest.mark.parametrize("device", [torch.device("cpu"), CUDA])
def test_precision_fp32_means_fp32_weights_and_no_autocast(gpu, device):
    gpu(7, 5)
    assert resolve_precision(device, "fp32").dtype is None
    assert weight_dtype(device, "auto", "fp32") == torch.float32
    assert weight_dtype(device, "fp16", "fp32") == torch.float16  # an explicit --dtype still wins


def test_on_a_gpu_the_big_tables_load_onto_the_cpu_first():
    tables = ["model.embed_tokens_per_layer", "model.embed_tokens", "lm_head"]
    assert device_map_for(CUDA, tables) == {"": 0, **{name: "cpu" for name in tables}}
    assert device_map_for(torch.device("cpu"), tables) == {"": "cpu"}


@pytest.mark.parametrize("quant", ["int8", "nf4"])
def test_transformers_accepts_the_map_that_puts_the_tables_on_the_cpu(quant):
    """transformers refuses a device map naming the CPU beside a GPU unless the config allows CPU offload, skipped
    modules or not: on a real GPU every int8 load with int8 embeddings stopped here. (On the CPU the flag must stay
    off: it leaves every CPU-mapped module unquantized; test_model checks that CPU loads are int8.)"""
    from transformers.quantizers.quantizer_bnb_4bit import Bnb4BitHfQuantizer
    from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

    from gemma_lowmem.model import _quantization_config

    tables = ["model.embed_tokens"]
    quantizer = {"int8": Bnb8BitHfQuantizer, "nf4": Bnb4BitHfQuantizer}[quant]
    config = _quantization_config(quant, torch.bfloat16, tables, cpu_offload=True)
    quantizer(config).validate_environment(device_map=device_map_for(CUDA, tables))
    config.llm_int8_enable_fp32_cpu_offload = False
    with pytest.raises(ValueError, match="dispatched on the CPU"):
        quantizer(config).validate_environment(device_map=device_map_for(CUDA, tables))


def _overflowing(model: torch.nn.Module) -> torch.nn.Module:
    # Large post-norm weights, as in the real Gemma 3 270M: each layer adds ~1e4 to the residual stream, which
    # passes fp16's max (65,504) after a few layers while no single norm output does.
    with torch.no_grad():
        for layer in model.get_decoder().layers:
            layer.post_attention_layernorm.weight.fill_(1e4)
            layer.post_feedforward_layernorm.weight.fill_(1e4)
    return model


def _batch(vocab: int = 200) -> dict:
    ids = torch.randint(6, vocab, (2, 24), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :8] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("build", [tiny_gemma3, tiny_gemma3n], ids=["gemma3", "gemma3n"])
def test_fp16_autocast_with_fp32_weights_survives_a_residual_stream_past_fp16_max(tmp_path, build):
    _overflowing(build(layers=4)).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    cpu = torch.device("cpu")
    batch = _batch()
    n = int((batch["labels"][:, 1:] != -100).sum())

    def loss(dtype: str, precision: str) -> float:
        model = load_base_model(ModelConfig(model=str(tmp_path), quant="int8", dtype=dtype), cpu, precision)
        hidden = model.get_decoder()(input_ids=batch["input_ids"][:, :4]).last_hidden_state
        assert hidden.dtype == weight_dtype(cpu, dtype, precision)
        with torch.no_grad(), resolve_precision(cpu, precision).autocast():
            return float(sft_loss(model, batch)) / n

    reference = loss("auto", "fp32")
    assert math.isfinite(reference)
    assert not math.isfinite(loss("fp16", "fp16"))  # the failure this guards against: fp16 weights overflow
    assert loss("auto", "fp16") == pytest.approx(reference, rel=2e-2)


def test_fp16_training_on_the_cpu_runs_the_grad_scaler(tmp_path):
    from tests.test_train import fit_sft

    _overflowing(tiny_gemma3(layers=4)).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    base = load_base_model(ModelConfig(model=str(tmp_path), quant="int8"), torch.device("cpu"), "fp16")
    model = add_lora(base, LoraConfig(r=4, alpha=8), gradient_checkpointing=True)
    rows = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in _batch()["input_ids"]] * 4
    cfg = TrainConfig(max_steps=3, lr=1e-3, batch_size=2, eval_every=0, log_every=1, precision="fp16",
                      packing=False, bucketing=False)
    result = fit_sft(model, rows, [], cfg, run_dir=tmp_path / "run")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scales = [r["loss_scale"] for r in records if "loss_scale" in r]
    assert scales and all(s >= 1.0 for s in scales)  # the scaler ran (fp16 only logs it)
    assert math.isfinite(result.final_loss)


def test_checkpoint_state_loads_onto_the_cpu_whatever_device_saved_it(tmp_path, monkeypatch):
    from gemma_lowmem import checkpoint
    from tests.test_train import examples, fit_sft, lora_model

    cfg = TrainConfig(max_steps=1, batch_size=2, eval_every=0, save_every=1, packing=False, precision="fp32")
    fit_sft(lora_model("gemma3"), examples(4), [], cfg, run_dir=tmp_path, show_progress=False)
    seen = []
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("map_location"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "load", spy)
    checkpoint.load_checkpoint(checkpoint.find_checkpoint(tmp_path), lora_model("gemma3"))
    assert seen == ["cpu"]  # a Colab checkpoint resumes on a CPU; torchrun ranks do not all land on cuda:0


def test_with_the_gpu_map_only_the_tables_stay_unquantized():
    """The offload flag leaves every CPU-mapped module out of int8: with the GPU's map that is the tables alone."""
    from bitsandbytes.nn import Linear8bitLt
    from transformers.quantizers.quantizer_bnb_8bit import Bnb8BitHfQuantizer

    from gemma_lowmem.model import _quantization_config
    from tests.tiny import tiny_gemma3

    with torch.device("meta"):
        model = tiny_gemma3()
    tables = ["model.embed_tokens"]
    quantizer = Bnb8BitHfQuantizer(_quantization_config("int8", torch.bfloat16, tables, cpu_offload=True))
    quantizer._process_model_before_weight_loading(model, device_map=device_map_for(CUDA, tables))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    assert linears and all(isinstance(m, Linear8bitLt) for m in linears)
