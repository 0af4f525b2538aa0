"""The memory planner: predict the peak of loading and of one training step, and choose settings that fit.

The peak of one training step (:func:`predict_peak`; :func:`plan_memory` chooses with it) is a sum of parts, read
off the model built on the meta device (no weights loaded). For a micro-batch of N = B x T tokens, activations
of ``a`` = 4 bytes (under bf16/fp16 autocast too: "Half-precision activations" below), L layers, stream width S
(H; 4 H for Gemma 3n's AltUp), MLP width I, vocabulary V and loss chunk C:

    frozen weights   int8 linears 1 B + an fp32 scale per row; nf4 0.5 B + 1/16 B; the rest in the weights' dtype;
                     big embedding tables (``embeddings``): row-wise int8, 1 B + a scale per row, for Gemma 3n's
                     per-layer table and the input embedding with a tied head; "disk" leaves the per-layer table
                     memory-mapped (its scales alone resident)
    LoRA             16 B per parameter: fp32 weight, gradient, AdamW's two moments
    runtime          CPU: 0.489 GiB (Python, torch, transformers, peft, bitsandbytes through a whole fit);
                     CUDA: 256 MiB of allocator slack (reserved over allocated: 0.24 / 0.26 GiB measured on an H200)
    model-level      N a x Gemma 3n's per-layer input width (L x 256), plus packed masks 2 B T^2
    checkpoints      N a L S: each layer's input
    the larger of    one layer's recompute and backward  N a (4.98 S + 15.8 I)
                     the loss chunk  C V x 8.24 B, plus the final hidden states and their gradient 2 N H a; an int8
                     tied head is walked in vocabulary blocks whose logits and dequantized rows share 256 MiB
    no checkpointing replaces checkpoints and recompute with  L x 0.82 x one layer's recompute

The four constants (4.98, 15.8, 8.24, 0.82) were fitted, least squares on the relative error, to peaks measured on
this CPU (2 cores, AVX2, so fp32 weights and activations; int8 linears, LoRA r16 on the 7 projections, packed rows,
512 labelled tokens per row, 2 optimizer steps of ``train.fit``, peak RSS of the whole process in a fresh subprocess
each, :func:`return_freed_memory_to_os` on) while bitsandbytes still kept its matmul inputs and the head was float.
Re-measured with ``gemma_lowmem_kernels.int8_linear`` and the int8 tied head (``benchmarks/e2b_memory.py --calibrate``):

    model, random int8 weights unless noted        tokens   checkpointing  chunk  measured GiB  predicted GiB
    Gemma 3n 1 layer, hidden 64 (the runtime)         64      on          -          0.489         0.490
    E2B widths (H 2048, I 8192, V 4096), 2 layers     512     on          -          0.991         1.018
      ... 4 layers                                    512     on          -          1.165         1.190
      ... 2 layers                                   2048     on          -          2.040         2.096
      ... 2 layers                                 2 x 1024   on          -          2.028         2.092
      ... 2 layers                                   1024     off         -          1.652         1.808
    Gemma 3 270M config (18 layers, H 640, V 262k) 2 x 1024   on          -          1.281         1.350
      ...                                            2048     on          -          1.229         1.354
      ...                                          2 x 1024   on         64          1.123         1.160
      ...                                            1024     off         -          2.931         3.218
    Gemma 3 270M, real weights (load_base_model)   2 x 1024   on          -          1.283         1.350

Ratios 0.91-1.00: the prediction errs on the safe side. 2 x 1024 and 1 x 2048 tokens peak alike: CPU ``sdpa``
keeps no (T, T) scores (eager attention would). Loading real weights has its own transient peak (1.688 GiB for the
270M above, measured when its tied embedding was read in fp32): :func:`predict_load_peak` counts it from the shapes,
and the run stops before loading when it exceeds the budget. Held out of the fit,
the full Gemma 3n E2B text model (``benchmarks/e2b_memory.py --warmup-tokens 128``, 1 x 2048 tokens, fp32):
measured 8.087 GiB, predicted 8.170 (ratio 0.990); with the per-layer table memory-mapped (``--embeddings disk``)
6.240 GiB, predicted 6.295 (0.991). Before ``gemma_lowmem_kernels.int8_linear`` and the int8 head it was 13.539
(13.556).
Without :func:`return_freed_memory_to_os` the 4-layer E2B-width run peaked at 1.927 GiB instead of 1.165.

Half-precision activations: counted at 4 bytes per element like fp32, because the measured peaks under bf16
autocast shrink far less than half (fp32 temporaries of the norms, softmax and loss, presumably: not broken down).
Counting them at 2 bytes under-predicted five of these six measurements (ratio = measured / predicted):

    bf16 autocast, bf16 weights                           tokens   measured GiB  at 2 B (ratio)  at 4 B (ratio)
    CPU (AVX-512 bf16), E2B widths, V 4096, 2 layers        2048       1.587      1.382 (1.15)    2.096 (0.76)
      ... 4 layers                                           512       1.149      0.995 (1.15)    1.190 (0.97)
      ... 2 layers, no checkpointing                        1024       1.355      1.267 (1.07)    1.808 (0.75)
    CPU, Gemma 3 270M config                             2 x 1024      1.216      1.301 (0.93)    1.350 (0.90)
    H200 (``benchmarks/gpu_check.py``), full E2B text model  2048       7.545      6.313 (1.20)    7.93  (0.95)
      ... per-layer table on the CPU (--embeddings-on-cpu)  2048       5.686      4.438 (1.28)    6.05  (0.94)

(CPU: ``benchmarks/e2b_memory.py ... --precision bf16 --dtype bf16``, peak RSS; H200: peak reserved, 7.305 /
5.429 GiB allocated, ``benchmarks/results/2026-12-04-gpu_check-h200.jsonl``.) None is over the 4-byte
prediction. With the table on the GPU, E2B at 2048 tokens does not fit 8 GB: the
planner then keeps the table on the CPU (:func:`plan_run`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from gemma_lowmem.device import resolve_precision, weight_dtype
from gemma_lowmem.errors import UserError
from gemma_lowmem.memory import BudgetTooSmall, GiB, WeightsExceedBudget, format_size, parse_size
from gemma_lowmem.model import BUNDLED, INT8_SKIP_MODULES, load_dtype, offline_hint, resolve_model_path
from gemma_lowmem_kernels.int8_embedding import DEFAULT_CHUNK_ELEMENTS
from gemma_lowmem_kernels.linear_cross_entropy import DEFAULT_CHUNK_BYTES

if TYPE_CHECKING:
    from gemma_lowmem.config import ModelConfig, RunConfig

SHIPPED_CONFIGS = {"gemma-3n-e2b": Path(__file__).parent / "configs" / "gemma3n_e2b_text.json"}

BYTES_PER_WEIGHT = {"int8": 1.0, "nf4": 0.5, "none": None}
# Bytes per quantized element beyond the payload: int8 keeps one fp32 scale per output row (added per row below),
# nf4 one fp32 absmax per block of 64 elements.
NF4_STATS_PER_WEIGHT = 4 / 64
# LoRA parameters are fp32; each has a gradient and AdamW's two moments: 4 x 4 bytes.
LORA_BYTES_PER_PARAM = 16
# Linears kept out of int8: the tied head, and Gemma 3n's tiny AltUp maps (4 x 4, 4 x 16, 2048 x 4), whose weights
# training reads as float matrices (``prediction_coefs.weight.data.clamp_``): ``llm_int8_skip_modules``.

# Calibrated constants (see the module docstring for the measurements behind them).
CPU_RUNTIME_BYTES = int(0.489 * GiB)  # peak RSS of a whole fit() on a 1-layer hidden-64 model (see the table)
CUDA_RUNTIME_BYTES = 256 * 2**20  # allocator slack over allocated memory (0.24 / 0.26 GiB measured on an H200)
ACT_BYTES = 4  # per activation element, under half-precision autocast too (see the module docstring)
RECOMPUTE_STREAM = 4.98  # one layer's recompute + backward, elements per token per unit of stream width
RECOMPUTE_INTERMEDIATE = 15.8  # ... per unit of MLP width
LAYER_FULL_FACTOR = 0.82  # without checkpointing each layer keeps this fraction of one layer's recompute
LOSS_CHUNK_BYTES_PER_LOGIT = 8.24  # bytes per (chunk token x vocab) alive in the chunked loss's backward
LOSS_CHUNK_CHOICES = (None, 128, 64, 32, 16)  # None: the loss's default (~256 MiB of fp32 logits)
EMBEDDINGS = ("float", "int8", "disk")
# The settings the planner chooses (unless the user gave them).
PLANNED = ("batch_size", "grad_accum", "gradient_checkpointing", "loss_chunk_size", "float_weights")
FLOAT_COPIES = "float copies of int8 linears"  # the breakdown's part for TrainConfig.float_weights


@dataclass(frozen=True)
class ModelShape:
    """What the planner reads off a model config, from the model built on the meta device.

    Attributes:
        num_layers: decoder layers.
        hidden: hidden size H.
        stream: width of what one layer hands the next (H; Gemma 3n's AltUp carries ``altup_num_inputs`` x H).
        intermediate: the widest MLP.
        attention_width: heads x head_dim.
        heads: attention heads.
        vocab: rows of the LM head.
        per_layer_width: Gemma 3n's per-layer inputs per token (layers x ``hidden_size_per_layer_input``), else 0.
        weight_bytes: frozen weight bytes by kind.
        lora_params: trainable LoRA parameters.
        int8_head: the LM head is the tied int8 embedding (the loss walks vocabulary blocks, see ``_activation_bytes``).
        table_elements: elements of the float tables that turn int8 after loading (the tied embedding, Gemma 3n's
            per-layer table), by :func:`describe_model`'s part names: the load reads them as floats first.
        quant: how the frozen linears are stored (``--quant``), for messages.
        int8_linear_elements: weights of the int8 linears (their float copies' size, ``TrainConfig.float_weights``).
    """

    num_layers: int
    hidden: int
    stream: int
    intermediate: int
    attention_width: int
    heads: int
    vocab: int
    per_layer_width: int
    weight_bytes: dict[str, int]
    lora_params: int
    int8_head: bool = False
    table_elements: dict[str, int] = field(default_factory=dict)
    quant: str = "int8"
    int8_linear_elements: int = 0


@dataclass(frozen=True)
class StepSpec:
    """One training micro-step, as the planner predicts its memory.

    Attributes:
        batch_size: rows per micro-batch.
        seq_len: tokens per row.
        gradient_checkpointing: recompute each layer in backward.
        loss_chunk_size: tokens per loss chunk (None: the loss's default).
        packed: rows are packed (each carries two (B, 1, T, T) masks).
        task_factor: sequences through the policy per row (``Task.activation_factor``: 2.0 for preference pairs,
            chosen and rejected both keep activations; the reference pass runs without grad and keeps none).
    """

    batch_size: int
    seq_len: int
    gradient_checkpointing: bool = True
    loss_chunk_size: int | None = None
    packed: bool = True
    task_factor: float = 1.0


def load_model_config(name: str) -> Any:
    """A text model config from a config.json path, a model folder, ``gemma-3n-e2b`` (shipped), ``gemma-3-270m``
    (bundled) or a hub id.

    Multimodal configs (Gemma 3n) give their ``text_config``.

    Raises:
        UserError: when nothing loadable is found.
    """
    from transformers import AutoConfig

    path = Path(name).expanduser()
    if name in SHIPPED_CONFIGS:
        path = SHIPPED_CONFIGS[name]
    elif name in BUNDLED:
        path = Path(resolve_model_path(name))
    try:
        if path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or "model_type" not in data:
                raise UserError(f"{path}: not a model config (no model_type)")
            config = AutoConfig.for_model(data.pop("model_type"), **data)
        elif path.is_dir() or name.count("/") == 1 and not name.startswith((".", "/", "~")):
            config = AutoConfig.from_pretrained(str(path) if path.is_dir() else name)
        else:
            raise UserError(
                f"--model {name}: no such file or folder, and not a hub id (owner/name); "
                f"shipped configs: {', '.join(SHIPPED_CONFIGS)}"
            )
    except OSError as err:  # a hub id without network, a missing or unreadable file
        raise UserError(offline_hint(name, err)) from None
    except (ValueError, json.JSONDecodeError) as err:
        raise UserError(f"--model {name}: cannot read a model config ({str(err).splitlines()[0]})") from None
    return getattr(config, "text_config", None) or config


def describe_model(
    model_config: Any,
    *,
    quant: str,
    dtype_bytes: int,
    embeddings: str = "int8",
    lora_r: int = 16,
    lora_targets: Sequence[str] = (),
) -> ModelShape:
    """Read the planner's view of a model off its config (built on the meta device: no memory, a few seconds).

    Args:
        model_config: a transformers text-model config.
        quant: "int8", "nf4" or "none": how the decoder's linears are held (the LM head never is).
        dtype_bytes: bytes per element of the frozen non-quantized weights (2 for bf16, 4 for fp32).
        embeddings: how the big tables are held (:func:`embeddings_mode`): "float" in the weights' dtype; "int8"
            row-wise (Gemma 3n's per-layer table, and the input embedding with its tied head); "disk" as "int8"
            with the per-layer table memory-mapped from a file.
        lora_r: LoRA rank.
        lora_targets: projection names that get an adapter.

    Returns:
        The :class:`ModelShape`.
    """
    from transformers import AutoModelForCausalLM

    if quant not in BYTES_PER_WEIGHT:
        raise UserError(f"quant={quant!r} is not one of {', '.join(BYTES_PER_WEIGHT)}")
    if embeddings not in EMBEDDINGS:
        raise UserError(f"embeddings={embeddings!r} is not one of {', '.join(EMBEDDINGS)}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    decoder = model.get_decoder()
    table = getattr(decoder, "embed_tokens_per_layer", None)
    head = model.get_output_embeddings()
    per_quantized = BYTES_PER_WEIGHT[quant]

    def quantized(name: str) -> bool:
        return per_quantized is not None and name.rsplit(".", 1)[-1] not in INT8_SKIP_MODULES

    weights = {"quantized linears": 0.0, "embedding and head": 0.0, "per-layer embedding": 0.0, "other frozen": 0.0}
    tables: dict[str, int] = {}
    int8_elements = 0
    seen: set[int] = set()
    for name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # a tied head shares the embedding's tensor
                continue
            seen.add(id(param))
            if isinstance(module, torch.nn.Linear) and param_name == "weight" and quantized(name):
                stats = 4 * param.shape[0] if quant == "int8" else param.numel() * NF4_STATS_PER_WEIGHT
                weights["quantized linears"] += param.numel() * per_quantized + stats
                int8_elements += param.numel() if quant == "int8" else 0
            elif module is table:
                per_row = {"float": param.shape[1] * dtype_bytes, "int8": param.shape[1] + 4, "disk": 4}[embeddings]
                weights["per-layer embedding"] += param.shape[0] * per_row
                if embeddings != "float":
                    tables["per-layer embedding"] = param.numel()
            elif module is model.get_input_embeddings():
                int8_rows = embeddings != "float" and head.weight is param  # only a tied embedding turns int8
                per_row = param.shape[1] + 4 if int8_rows else param.shape[1] * dtype_bytes
                weights["embedding and head"] += param.shape[0] * per_row
                if int8_rows:
                    tables["embedding and head"] = param.numel()
            elif module is head:  # an untied head stays in the weights' dtype
                weights["embedding and head"] += param.numel() * dtype_bytes
            else:
                weights["other frozen"] += param.numel() * dtype_bytes

    targets = set(lora_targets)
    lora = sum(
        lora_r * (m.in_features + m.out_features)
        for name, m in decoder.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )
    layers = list(decoder.layers)
    cfg = model_config
    altup = getattr(cfg, "altup_num_inputs", 1) or 1
    intermediate = cfg.intermediate_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    per_layer = getattr(cfg, "hidden_size_per_layer_input", 0) or 0
    return ModelShape(
        num_layers=len(layers),
        hidden=cfg.hidden_size,
        stream=cfg.hidden_size * altup,
        intermediate=max(intermediate) if isinstance(intermediate, (list, tuple)) else intermediate,
        attention_width=heads * head_dim,
        heads=heads,
        vocab=head.weight.shape[0],
        per_layer_width=per_layer * len(layers),
        weight_bytes={k: int(v) for k, v in weights.items()},
        lora_params=lora,
        int8_head=embeddings != "float" and head.weight is model.get_input_embeddings().weight,
        table_elements=tables,
        quant=quant,
        int8_linear_elements=int8_elements,
    )


def predict_load_peak(shape: ModelShape, *, device_type: str, load_bytes: int, tables_on_cpu: bool = False
                      ) -> dict[str, int]:
    """Predicted peak of loading the model (bytes, by part), from the shapes; the peak is the sum.

    ``model.load_base_model`` reads every float weight in the checkpoint's dtype (``load_bytes`` per element) and
    the linears straight into int8. On a GPU the tables that turn int8 (:attr:`ModelShape.table_elements`) are
    read onto the CPU and quantized into their int8 place a chunk at a time, so the GPU holds only final weights
    and one chunk. On the CPU the float tables are resident while their int8 copies are made, and this is the
    load's peak (a memory-mapped per-layer table, ``embeddings="disk"``, is written a chunk at a time).

    Args:
        shape: :func:`describe_model`'s result for the run's embeddings mode.
        device_type: "cuda" (the GPU's allocated memory) or "cpu" (the process's RSS).
        load_bytes: bytes per element of the float weights as read (2 for a bf16 checkpoint).
        tables_on_cpu: on a GPU, the per-layer table stays on the CPU (``--embeddings-on-cpu``/``-on-disk``).

    Returns:
        ``{part: bytes}``.
    """
    parts: dict[str, float] = dict(shape.weight_bytes)
    if device_type == "cuda" and tables_on_cpu:
        parts.pop("per-layer embedding", None)
    parts["runtime"] = CPU_RUNTIME_BYTES if device_type == "cpu" else CUDA_RUNTIME_BYTES
    # one chunk of rows in fp32 and its int8 copy (tables), or the float weight of the largest linear (bitsandbytes)
    parts["quantization chunk"] = DEFAULT_CHUNK_ELEMENTS * 5
    if device_type == "cpu":
        parts["float tables while quantized"] = sum(shape.table_elements.values()) * load_bytes
    return {k: int(v) for k, v in parts.items() if v}


def fixed_bytes(shape: ModelShape, device_type: str) -> int:
    """What a step holds whatever the batch: frozen weights, the adapter's states and the runtime."""
    runtime = CPU_RUNTIME_BYTES if device_type == "cpu" else CUDA_RUNTIME_BYTES
    return sum(shape.weight_bytes.values()) + shape.lora_params * LORA_BYTES_PER_PARAM + runtime


def default_loss_chunk(vocab: int) -> int:
    """Tokens per loss chunk that ``gemma_lowmem_kernels.linear_cross_entropy`` picks when none is given."""
    return max(1, DEFAULT_CHUNK_BYTES // (vocab * 4))


def _activation_bytes(shape: ModelShape, step: StepSpec) -> dict[str, float]:
    tokens = step.batch_size * step.seq_len * step.task_factor  # (B x T) rows of tokens through the policy
    a = ACT_BYTES
    h = shape.hidden
    # (B, 1, T, T) bool masks, full + sliding
    masks = 2 * step.batch_size * step.seq_len * step.seq_len * step.task_factor if step.packed else 0
    per_layer_recompute = tokens * a * (RECOMPUTE_STREAM * shape.stream + RECOMPUTE_INTERMEDIATE * shape.intermediate)
    # Gemma 3n's per-layer inputs (B, T, layers x 256) feed every layer; packed rows carry their masks
    out = {"model-level activations": tokens * a * shape.per_layer_width + masks}
    if step.gradient_checkpointing:
        out["layer inputs kept by checkpointing"] = tokens * a * shape.num_layers * shape.stream
        layer = per_layer_recompute
    else:
        out["all layers' activations"] = shape.num_layers * LAYER_FULL_FACTOR * per_layer_recompute
        layer = 0.0
    if shape.int8_head and step.loss_chunk_size is None:
        # Vocabulary blocks of the int8 head: a block's fp32 logits (tokens x rows) and its dequantized fp32 weights
        # (rows x H) share DEFAULT_CHUNK_BYTES.
        rows = min(DEFAULT_CHUNK_BYTES / 4 / (tokens + h), shape.vocab)  # no block beyond the vocabulary
        logits, block_weights = tokens * rows, rows * h * 4
    else:
        logits = min(step.loss_chunk_size or default_loss_chunk(shape.vocab), int(tokens)) * shape.vocab
        block_weights = logits * h * 4 / tokens if shape.int8_head else 0.0  # as many logits, rows of H fp32
    loss = logits * LOSS_CHUNK_BYTES_PER_LOGIT + block_weights + 2 * tokens * h * a  # + hidden and its gradient
    # The loss's backward finishes before the last layer's recompute starts: only the larger is alive.
    out["one layer's recompute" if layer >= loss else "loss chunk"] = max(layer, loss)
    return out


def predict_peak(shape: ModelShape, step: StepSpec, device_type: str) -> dict[str, int]:
    """Predicted peak memory of one training step, by part (bytes); the peak is the sum.

    Args:
        shape: the model as stored (:func:`describe_model`).
        step: the micro-step.
        device_type: "cpu" (peak RSS, with the Python runtime) or "cuda" (peak reserved).

    Returns:
        ``{part: bytes}``.
    """
    parts: dict[str, float] = dict(shape.weight_bytes)
    parts["LoRA weights, grads, AdamW"] = shape.lora_params * LORA_BYTES_PER_PARAM
    parts["runtime"] = CPU_RUNTIME_BYTES if device_type == "cpu" else CUDA_RUNTIME_BYTES
    parts.update(_activation_bytes(shape, step))
    return {k: int(v) for k, v in parts.items() if v}


@dataclass
class MemoryPlan:
    """The planner's choices for a budget, and the predicted peak they give.

    Attributes:
        batch_size: rows of ``max_seq_length`` tokens per micro-batch.
        grad_accum: micro-batches per optimizer step (``batch_size * grad_accum`` rows reach the global batch).
        gradient_checkpointing: recompute each layer in backward.
        loss_chunk_size: tokens per loss chunk (None: the loss's default, ~256 MiB of fp32 logits).
        predicted_peak: bytes (the sum of ``breakdown``).
        breakdown: ``{part: bytes}``.
        budget: the budget in bytes.
        seq_len: tokens per row the plan was made for.
        load_peak: predicted peak of loading the model, bytes (:func:`predict_load_peak`; 0: not predicted).
        embeddings_on_cpu: the plan keeps Gemma 3n's per-layer table on the CPU (the step did not fit the GPU's
            budget with it there).
        float_weights: the run keeps float copies of the int8 linears (``TrainConfig.float_weights``; their bytes
            are then the breakdown's :data:`FLOAT_COPIES` part).
        float_copy_bytes: what those copies take, kept or not (0: no int8 linears).
    """

    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    loss_chunk_size: int | None
    predicted_peak: int
    breakdown: dict[str, int]
    budget: int
    seq_len: int = 0
    load_peak: int = 0
    embeddings_on_cpu: bool = False
    float_weights: bool = False
    float_copy_bytes: int = 0

    def table(self) -> str:
        """A readable table: each part of the predicted peak, the total against the budget, and the choices."""
        width = max(len(k) for k in [*self.breakdown, "predicted peak"]) + 2
        lines = [f"{'part':<{width}}{'GiB':>8}", "-" * (width + 8)]
        lines += [f"{k:<{width}}{v / GiB:>8.2f}" for k, v in self.breakdown.items()]
        lines += ["-" * (width + 8), f"{'predicted peak':<{width}}{self.predicted_peak / GiB:>8.2f}",
                  f"{'budget':<{width}}{self.budget / GiB:>8.2f}"]
        if self.load_peak:
            lines.append(f"{'loading (peak)':<{width}}{self.load_peak / GiB:>8.2f}")
        lines.append("")
        chunk = "default" if self.loss_chunk_size is None else f"{self.loss_chunk_size} tokens"
        lines += [
            f"micro-batch: {self.batch_size} x {self.seq_len} tokens; grad_accum {self.grad_accum} "
            f"(global batch {self.batch_size * self.grad_accum} rows)",
            f"gradient checkpointing: {'on' if self.gradient_checkpointing else 'off'}; loss chunk: {chunk}",
        ]
        if self.float_copy_bytes:
            lines.append("frozen int8 linears: " + ("float copies kept for the whole run" if self.float_weights else
                                                    f"dequantized at every use (float copies need "
                                                    f"{self.float_copy_bytes / GiB:.2f} GiB more)"))
        if self.embeddings_on_cpu:
            lines.append("per-layer embedding table: on the CPU (the step does not fit with it on the GPU)")
        return "\n".join(lines)

    def apply(self, cfg: RunConfig) -> RunConfig:
        """A copy of ``cfg`` with the plan's batch size, accumulation, checkpointing, loss chunk and, where the plan
        moved it, the per-layer table's place."""
        train = replace(
            cfg.train, batch_size=self.batch_size, grad_accum=self.grad_accum,
            gradient_checkpointing=self.gradient_checkpointing,
            loss_chunk_size=self.loss_chunk_size if cfg.train.chunked_loss else cfg.train.loss_chunk_size,
            float_weights=self.float_weights,
        )
        model = replace(cfg.model, embeddings_on_cpu=True) if self.embeddings_on_cpu else cfg.model
        return replace(cfg, model=model, train=train)


def plan_memory(
    shape: ModelShape,
    *,
    budget: int | str,
    step: StepSpec,
    global_batch_tokens: int,
    device_type: str,
    fixed: dict[str, Any] | None = None,
    float_copy_bytes: int = 0,
) -> MemoryPlan:
    """Choose micro-batch, accumulation, checkpointing and loss chunk so that the predicted peak fits ``budget``,
    then keep float copies of the int8 linears if they fit beside it.

    Preference, fastest first: checkpointing off (recompute costs about a third more compute) over a larger
    micro-batch; then the largest micro-batch that divides the global batch (so that ``batch_size * grad_accum``
    is exactly the global batch in rows); then the largest loss chunk. The copies come last: they save the
    per-use dequantization, not a step's layout. Choices in ``fixed`` are kept.

    Args:
        shape: the model as stored (:func:`describe_model`).
        budget: bytes, or a size as ``--max-mem`` takes it (``8GB``: errors quote it as given).
        step: the micro-step's row length (``seq_len``: packed rows are this long), activation dtype, packing and
            task factor; its batch size, checkpointing and loss chunk are what the plan chooses.
        global_batch_tokens: tokens per optimizer step to reach (rounded up to whole rows).
        device_type: "cpu" or "cuda".
        fixed: choices the user made, kept as they are: ``batch_size`` (with ``grad_accum``: the micro-batch split
            of the global batch), ``gradient_checkpointing``, ``loss_chunk_size``, ``float_weights``.
        float_copy_bytes: bytes of the int8 linears' float copies in the compute dtype (0: none to copy).

    Returns:
        The :class:`MemoryPlan`.

    Raises:
        WeightsExceedBudget: the frozen weights, adapter states and runtime alone exceed the budget.
        BudgetTooSmall: even one row with checkpointing and the smallest loss chunk does not fit, or nothing fits
            with the ``fixed`` choices (the message names them).
    """
    max_seq_length = step.seq_len
    rows = max(1, -(-global_batch_tokens // max_seq_length))

    fixed = fixed or {}
    copies = {FLOAT_COPIES: float_copy_bytes} if float_copy_bytes and fixed.get("float_weights") is not False else {}
    # Given copies (float_weights=True) are part of every candidate; otherwise they are added after the choice.
    given = copies if fixed.get("float_weights") else {}

    def predict(batch: int, checkpointing: bool, chunk: int | None, seq: int = max_seq_length) -> dict[str, int]:
        return predict_peak(shape, replace(step, batch_size=batch, seq_len=seq, gradient_checkpointing=checkpointing,
                                           loss_chunk_size=chunk), device_type) | given

    label = budget if isinstance(budget, str) else format_size(budget)
    budget = parse_size(budget) if isinstance(budget, str) else budget
    baseline = fixed_bytes(shape, device_type)
    # the smallest plan (without given copies: a budget that only they break names the settings given)
    needed = sum(predict(1, True, LOSS_CHUNK_CHOICES[-1]).values()) - sum(given.values())
    if baseline > budget:
        raise WeightsExceedBudget(
            f"--max-mem {label} is below the frozen weights, adapter and runtime alone "
            f"({format_size(baseline)} with --quant {shape.quant}); training needs at least {format_size(needed)}",
            needed=needed,
        )
    if "batch_size" in fixed:
        batches = [fixed["batch_size"]]
        rows = fixed["batch_size"] * fixed.get("grad_accum", -(-rows // fixed["batch_size"]))
    else:
        batches = [b for b in range(rows, 0, -1) if rows % b == 0]  # divisors: accumulation hits the global batch
    checkpointing_choices = [fixed["gradient_checkpointing"]] if "gradient_checkpointing" in fixed else [False, True]
    chunks = [fixed["loss_chunk_size"]] if "loss_chunk_size" in fixed else LOSS_CHUNK_CHOICES
    for checkpointing in checkpointing_choices:
        for batch in batches:
            for chunk in chunks:
                parts = predict(batch, checkpointing, chunk)
                peak = sum(parts.values())
                if peak <= budget:
                    if copies and not given and peak + float_copy_bytes <= budget:
                        parts, peak = parts | copies, peak + float_copy_bytes
                    return MemoryPlan(batch, rows // batch, checkpointing, chunk, peak, parts, budget,
                                      max_seq_length, float_weights=FLOAT_COPIES in parts,
                                      float_copy_bytes=float_copy_bytes)
    if fixed and needed <= budget:
        smallest = min(sum(predict(b, c, k).values()) for b in batches for c in checkpointing_choices for k in chunks)
        settings = ", ".join(f"{name}={value}" for name, value in fixed.items())
        raise BudgetTooSmall(
            f"--max-mem {label}: with the settings you gave ({settings}) the predicted peak is "
            f"{format_size(smallest)}; leave them out to let the planner choose, or give more memory",
            needed=smallest,
        )
    shorter = next((seq for seq in (max_seq_length >> i for i in range(1, 8))
                    if seq >= 64 and sum(predict(1, True, LOSS_CHUNK_CHOICES[-1], seq).values()) <= budget), None)
    hint = f"--max-seq-length {shorter} fits" if shorter else "no row length of 64 tokens or more fits"
    raise BudgetTooSmall(
        f"--max-mem {label} is too small for rows of {max_seq_length} tokens: one row with "
        f"checkpointing needs {format_size(needed)}; give more memory, or a smaller --max-seq-length ({hint})",
        needed=needed,
    )


def embeddings_mode(model: ModelConfig, device_type: str = "cpu") -> str:
    """How a run holds the big embedding tables, for :func:`describe_model`: "float", "int8" or "disk".

    On a GPU ``--embeddings-on-cpu`` counts as "disk": the per-layer table is off the device either way (only its
    scales, 4 bytes a row, are counted; they too stay on the CPU).
    """
    if not model.int8_embeddings:
        return "float"
    off_device = model.embeddings_on_cpu and device_type == "cuda"
    return "disk" if model.embeddings_on_disk or off_device else "int8"


def describe_run(cfg: RunConfig, model_config: Any, device: torch.device) -> ModelShape:
    """The model as a run holds it (:func:`describe_model`): the run's quantization, the frozen weights' dtype that
    ``device`` and ``cfg.train.precision`` give (:func:`~gemma_lowmem.device.weight_dtype`), its embeddings mode and
    its LoRA adapter.

    Args:
        cfg: the run's config.
        model_config: the text model's config (:func:`load_model_config`).
        device: where the run trains.

    Returns:
        The :class:`ModelShape`.
    """
    weights = weight_dtype(device, cfg.model.dtype, cfg.train.precision)
    return describe_model(model_config, quant=cfg.model.quant, dtype_bytes=weights.itemsize,
                          embeddings=embeddings_mode(cfg.model, device.type), lora_r=cfg.lora.r,
                          lora_targets=cfg.lora.target_modules)


def plan_run(cfg: RunConfig, model_config: Any, device: torch.device, keep: Collection[str] = (),
             activation_factor: float = 1.0) -> MemoryPlan:
    """The memory plan of a training run: ``cfg.train.max_mem`` for rows of ``pack_len`` (or ``max_seq_length``)
    tokens and the config's global batch (``batch_size * grad_accum`` rows).

    Args:
        cfg: the run's config.
        model_config: the text model's config (:func:`load_model_config`).
        device: where the run trains (picks the weights' and activations' dtypes as the run will).
        keep: names among :data:`PLANNED` whose config values the plan must keep (the ones the user gave);
            ``batch_size`` and ``grad_accum`` are kept together.
        activation_factor: the task's sequences through the policy per row (``Task.activation_factor``).

    Returns:
        The :class:`MemoryPlan` (``plan.apply(cfg)`` gives the config to train with).

    Raises:
        BudgetTooSmall: as :func:`plan_memory`.
    """
    train = cfg.train
    seq = (train.pack_len or cfg.data.max_seq_length) if train.packing else cfg.data.max_seq_length
    fixed = {name: getattr(train, name) for name in PLANNED if name in keep}
    if fixed.get("float_weights", False) is None:  # given as "let the plan decide"
        del fixed["float_weights"]
    if "batch_size" in fixed or "grad_accum" in fixed:
        fixed.update(batch_size=train.batch_size, grad_accum=train.grad_accum)
    if not train.chunked_loss:  # the model's own loss: full logits of every position, as one "chunk"
        fixed["loss_chunk_size"] = train.batch_size * seq
    shape = describe_run(cfg, model_config, device)
    weights = weight_dtype(device, cfg.model.dtype, train.precision)
    load = sum(predict_load_peak(
        shape, device_type=device.type, load_bytes=load_dtype(model_config, weights).itemsize,
        tables_on_cpu=cfg.model.embeddings_on_cpu or cfg.model.embeddings_on_disk,
    ).values())
    step = StepSpec(batch_size=1, seq_len=seq, packed=train.packing, task_factor=activation_factor)
    compute = resolve_precision(device, train.precision).dtype or torch.float32  # the copies' dtype: the matmuls'
    try:
        plan = plan_memory(shape, budget=train.max_mem, step=step, global_batch_tokens=train.batch_size
                           * train.grad_accum * seq, device_type=device.type, fixed=fixed,
                           float_copy_bytes=shape.int8_linear_elements * compute.itemsize)
    except BudgetTooSmall:
        # Gemma 3n's per-layer table on the GPU (1.9 GiB for E2B) can be what breaks the budget (E2B, 2048 tokens,
        # 8 GB: 7.545 GiB measured on an H200): then keep it on the CPU, where it is only ever gathered from.
        if not (device.type == "cuda" and embeddings_mode(cfg.model, device.type) == "int8"
                and shape.weight_bytes.get("per-layer embedding")):
            raise
        tables_off = replace(cfg, model=replace(cfg.model, embeddings_on_cpu=True))
        return replace(plan_run(tables_off, model_config, device, keep, activation_factor), embeddings_on_cpu=True)
    if load > plan.budget:  # after the step's plan: a budget below the weights says so first
        raise BudgetTooSmall(
            f"--max-mem {train.max_mem}: loading {cfg.model.model} peaks at {format_size(load)} "
            f"(float tables read before they turn int8); give --max-mem {math.ceil(load / 1e9 * 10) / 10:.1f}GB"
            + ("" if device.type == "cpu" or cfg.model.embeddings_on_cpu else " or --embeddings-on-cpu"),
            needed=load,
        )
    return replace(plan, load_peak=load)


def apply_plan(cfg: RunConfig, plan: MemoryPlan, device_type: str) -> RunConfig:
    """The config to train with (``plan.apply(cfg)``); prints the plan as every run does: the budget, the settings
    the plan changed and :meth:`MemoryPlan.table`. ``scripts/plan_memory.py`` prints it the same way.

    Args:
        cfg: the run's config, as given.
        plan: its plan (:func:`plan_run`).
        device_type: "cpu" or "cuda", for the heading.

    Returns:
        The planned config.
    """
    planned = plan.apply(cfg)
    changed = [f"{name} {getattr(cfg.train, name)} -> {getattr(planned.train, name)}" for name in PLANNED
               if getattr(cfg.train, name) != getattr(planned.train, name)]
    if planned.model.embeddings_on_cpu != cfg.model.embeddings_on_cpu:
        changed.append("embeddings_on_cpu False -> True")
    print(f"memory plan for --max-mem {cfg.train.max_mem} on {device_type}"
          + (f" ({'; '.join(changed)})" if changed else "") + "\n" + plan.table())
    return planned
