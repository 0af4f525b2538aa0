"""Model loading: a multimodal checkpoint loads as a text-only causal LM with the same language-model weights."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Gemma3Config, Gemma3ForConditionalGeneration, SiglipVisionConfig

from gemma_lowmem.config import ModelConfig
from gemma_lowmem.model import load_base_model
from tests.tiny import gemma3_config, tiny_tokenizer


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_multimodal_checkpoint_loads_only_the_language_model(tmp_path, prefix):
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=32, patch_size=8)
    config = Gemma3Config(text_config=gemma3_config().to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4)
    torch.manual_seed(0)
    multimodal = Gemma3ForConditionalGeneration(config).eval()
    multimodal.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    # Rewrite the keys in the given layout (transformers saves one, hub checkpoints use the other).
    old = "language_model.model."
    renamed = {prefix + k[len(old):] if k.startswith(old) else k: v for k, v in weights.items()}
    assert any(k.startswith(prefix + "layers.0.") for k in renamed)
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})

    model = load_base_model(ModelConfig(model=str(tmp_path), quant="none", dtype="fp32", int8_embeddings=False),
                            torch.device("cpu"))
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert not any("vision" in name or "multi_modal" in name for name, _ in model.named_parameters())
    ids = torch.randint(6, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, multimodal(input_ids=ids).logits)


def test_int8_gemma3n_with_lora_trains(tmp_path):
    from gemma_lowmem.config import LoraConfig
    from gemma_lowmem.data.collate import collate
    from gemma_lowmem.loss import sft_loss
    from gemma_lowmem.model import add_lora
    from tests.tiny import tiny_gemma3n

    tiny_gemma3n().save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    base = load_base_model(ModelConfig(model=str(tmp_path), quant="int8"), torch.device("cpu"))
    model = add_lora(base, LoraConfig(r=4, alpha=8), gradient_checkpointing=True)
    model.train()
    batch = collate([[{"input_ids": list(range(6, 30)), "labels": [-100] * 10 + list(range(16, 30))}]], pad_id=0,
                    packed=False)
    loss = sft_loss(model, batch)
    loss.backward()  # AltUp's clamped weights stay float (INT8_SKIP_MODULES): int8 storage there would fail here
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n)


def test_int8_layers_run_the_kernel_that_keeps_no_input_and_match_bitsandbytes(tmp_path):
    """Loaded int8 layers are FrozenInt8Linear (PEFT still wraps them as int8 LoRA layers); they give what
    bitsandbytes' own training-mode matmul gives, and the same in eval mode."""
    from bitsandbytes.nn import Linear8bitLt
    from peft.tuners.lora.bnb import Linear8bitLt as LoraLinear8bitLt

    from gemma_lowmem.config import LoraConfig
    from gemma_lowmem.model import FrozenInt8Linear, add_lora
    from tests.tiny import tiny_gemma3

    tiny_gemma3().save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    base = load_base_model(ModelConfig(model=str(tmp_path), quant="int8"), torch.device("cpu"))
    int8 = [m for m in base.modules() if isinstance(m, Linear8bitLt)]
    assert int8 and all(type(m) is FrozenInt8Linear for m in int8)
    layer = int8[0].train()  # from_pretrained leaves eval mode, where bitsandbytes quantizes the inputs too
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    ours = layer(x)
    (grad_ours,) = torch.autograd.grad(ours.sum(), x)
    reference = Linear8bitLt.forward(layer, x)  # bitsandbytes' own path, training mode
    (grad_ref,) = torch.autograd.grad(reference.sum(), x)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-5, atol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x), ours, rtol=0, atol=0)  # eval: the same dequantize + matmul
    model = add_lora(base, LoraConfig(r=4, alpha=8), gradient_checkpointing=False)
    assert any(isinstance(m, LoraLinear8bitLt) for m in model.modules())


def test_moving_a_model_moves_each_int8_layers_row_scales_with_its_weight(tmp_path):
    """``Module.to`` replaces only ``weight.data``: bitsandbytes' scales (``SCB``) and its int8 copy (``CB``) stayed
    behind, and the first forward on a GPU failed with tensors on two devices (benchmarks/gpu_check.py on an H200,
    which runs again with this). The CPU has no second device: the test replays the move with a copy, which shows
    the int8 copy following the weight; the scales' device is checked by gpu_check alone."""
    from gemma_lowmem.model import FrozenInt8Linear
    from tests.tiny import tiny_gemma3

    tiny_gemma3().save_pretrained(tmp_path)
    base = load_base_model(ModelConfig(model=str(tmp_path), quant="int8", int8_embeddings=False), torch.device("cpu"))
    layers = [m for m in base.modules() if isinstance(m, FrozenInt8Linear)]
    assert layers and all(m.weight.CB.data_ptr() == m.weight.data_ptr() for m in layers)
    # What a move to a GPU does to each parameter, on the CPU: a new tensor assigned to weight.data.
    base._apply(lambda t: t.clone())
    for layer in layers:
        assert layer.weight.CB.data_ptr() == layer.weight.data_ptr()  # not the old tensor, alive on the old device


def test_tied_embedding_and_head_as_int8_rows(tmp_path):
    """The tied embedding becomes one int8 table that the lookup and the head share (no float copy of either);
    logits stay within quantization error of the float model, and the chunked loss (vocabulary blocks) equals the
    full-logits loss through the head."""
    from gemma_lowmem.config import LoraConfig
    from gemma_lowmem.data.collate import collate
    from gemma_lowmem.loss import sft_loss
    from gemma_lowmem.model import Int8TiedHead, add_lora
    from gemma_lowmem_kernels import Int8Embedding
    from tests.tiny import tiny_gemma3

    reference = tiny_gemma3().eval()
    reference.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    base = load_base_model(ModelConfig(model=str(tmp_path), quant="none", dtype="fp32"), torch.device("cpu"))
    table, head = base.get_input_embeddings(), base.get_output_embeddings()
    assert isinstance(table, Int8Embedding) and isinstance(head, Int8TiedHead)
    assert head.weight is table.q and head.weight_scale is table.scale  # shared, not copied
    assert not any(p.numel() >= table.q.numel() for p in base.parameters())  # no float table left
    ids = torch.randint(6, 1000, (2, 12))
    with torch.no_grad():
        ours, theirs = base(input_ids=ids).logits, reference(input_ids=ids).logits
    assert (ours - theirs).abs().max() < 0.05 * theirs.abs().max()  # row-wise int8 error, not a different model
    model = add_lora(base, LoraConfig(r=4, alpha=8), gradient_checkpointing=False)
    batch = collate([[{"input_ids": list(range(6, 30)), "labels": [-100] * 10 + list(range(16, 30))}]], pad_id=0,
                    packed=False)
    full = sft_loss(model, batch, chunked=False)
    for chunk in (None, 1, 3):  # the loop's tokens per chunk become vocabulary blocks of as many logits
        torch.testing.assert_close(sft_loss(model, batch, chunk_size=chunk), full, rtol=1e-5, atol=1e-4)
    untied = load_base_model(ModelConfig(model=str(tmp_path), quant="none", dtype="fp32", int8_embeddings=False),
                             torch.device("cpu"))
    assert isinstance(untied.get_input_embeddings(), torch.nn.Embedding)


def test_float_weight_cache_decodes_the_same_within_its_cap_and_leaves_training_alone(tmp_path):
    """Inside float_weight_cache, int8 layers (LoRA-wrapped linears and the tied head) decode with whole float
    copies: the same logits and greedy tokens as the kernel; a cap leaves the layers past it on the kernel; a
    forward with autograd makes no copy; nothing is left on the layers after the block."""
    from gemma_lowmem.config import LoraConfig
    from gemma_lowmem.evaluation.generate import generate_ids
    from gemma_lowmem.model import FrozenInt8Linear, Int8TiedHead, add_lora, float_weight_cache
    from tests.tiny import tiny_gemma3

    tiny_gemma3().save_pretrained(tmp_path)
    base = load_base_model(ModelConfig(model=str(tmp_path), quant="int8", dtype="fp32"), torch.device("cpu"))
    model = add_lora(base, LoraConfig(r=4, alpha=8), gradient_checkpointing=False)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # a trained adapter: LoRA must still add its part
    layers = [m for m in model.modules() if isinstance(m, FrozenInt8Linear | Int8TiedHead)]
    assert any(isinstance(m, Int8TiedHead) for m in layers) and len(layers) > 2
    all_bytes = sum(m.weight.numel() * 4 for m in layers)
    ids = torch.randint(6, 1000, (2, 9))
    prompts = [list(range(6, 20)), list(range(30, 37))]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    tokens = generate_ids(model, prompts, pad_id=0, stop_ids=[1], max_new_tokens=6, show_progress=False)
    for cap, fits_all in ((all_bytes, True), (all_bytes // 2, False)):
        with float_weight_cache(model, max_bytes=cap) as weights:
            with torch.enable_grad():
                model(input_ids=ids)
            assert weights.used == 0  # under autograd: the kernel, no copy
            with torch.no_grad():
                torch.testing.assert_close(model(input_ids=ids).logits, logits, rtol=1e-5, atol=1e-5)
            assert generate_ids(model, prompts, pad_id=0, stop_ids=[1], max_new_tokens=6,
                                show_progress=False) == tokens
            if not fits_all:  # capped: some layers fit, the rest were refused
                assert 0 < weights.used <= all_bytes // 2 and weights.skipped > 0
            else:
                assert weights.used == all_bytes and weights.skipped == 0
        assert weights.used == 0 and not any("_float_weights" in m.__dict__ for m in layers)


def test_float_weight_cache_for_training_gives_the_kernels_loss_and_gradients_and_keeps_no_input(tmp_path):
    """TrainConfig.float_weights: inside float_weight_cache(training=True) the decoder's int8 linears train on
    whole float copies (the tied head keeps its int8 rows), with the loss and LoRA gradients of the kernel (as
    accurate against an fp64 gold) and, like the kernel, no saved input."""
    from gemma_lowmem.config import LoraConfig
    from gemma_lowmem.data.collate import collate
    from gemma_lowmem.loss import sft_loss
    from gemma_lowmem.model import FrozenInt8Linear, add_lora, float_weight_cache
    from tests.tiny import tiny_gemma3
    from tests.tolerance import assert_as_accurate, fp64_copy

    tiny_gemma3().save_pretrained(tmp_path)
    base = load_base_model(ModelConfig(model=str(tmp_path), quant="int8", dtype="fp32"), torch.device("cpu"))
    model = add_lora(base, LoraConfig(r=4, alpha=8, dropout=0.0), gradient_checkpointing=True).train()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 would leave every LoRA-A gradient zero
    batch = collate([[{"input_ids": list(range(6, 30)), "labels": [-100] * 10 + list(range(16, 30))}]], pad_id=0,
                    packed=False)
    linears = [m for m in model.modules() if isinstance(m, FrozenInt8Linear)]

    def loss_and_grads(m: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        m.zero_grad()
        loss = sft_loss(m, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}

    kernel = loss_and_grads(model)
    with float_weight_cache(model, max_bytes=2**40, training=True) as weights:
        copies = loss_and_grads(model)
        assert weights.used == sum(m.weight.numel() * 4 for m in linears) and weights.skipped == 0
        x = torch.randn(3, linears[0].in_features, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            linears[0](x)
        assert saved and all(t.data_ptr() != x.data_ptr() for t in saved)  # the weight only, never the input
    assert not any("_float_weights" in m.__dict__ for m in model.modules())
    gold = loss_and_grads(fp64_copy(model))
    torch.testing.assert_close(copies[0], kernel[0])  # the summed loss comes out in fp32 even from the fp64 gold
    assert_as_accurate(copies[1], kernel[1], gold[1], name="LoRA gradients")
