"""Run configuration: one dataclass per concern, each field with a default and a one-line help.

The CLI (``gemma_lowmem.cli``) is generated from these fields (the ``help`` metadata), and the resolved
configuration is saved as JSON with every run and checkpoint.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from gemma_lowmem.errors import UserError
from gemma_lowmem.tasks import task_names  # the registry names its tasks without importing them

# How rubric answers are decoded (``evaluation.guided``, which reads them from here as ``MODES``): defined where
# importing costs nothing, for --mode's choices.
EVAL_MODES = ("guided", "scores", "free")


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field whose help text feeds ``--help``."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def _check_choices(section: Any) -> None:
    """Each field of ``section`` whose metadata lists ``choices`` holds one of them (the one list flags use too)."""
    for f in fields(section):
        choices = f.metadata.get("choices")
        value = getattr(section, f.name)
        if choices is not None and value not in choices:
            raise UserError(f"{f.name}={value!r} is not one of {', '.join(map(str, choices))}")


def _check_positive(name: str, value: float | int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise UserError(f"{name}={value!r} must be > 0")


@dataclass
class ModelConfig:
    """Which model to load and how to hold its frozen weights."""

    model: str = _f(
        "google/gemma-3n-E2B-it",
        "hub id, local model folder, .gguf file, or the short name gemma-3-270m (bundled, needs the demo extra)",
    )
    quant: str = _f(
        "int8", "frozen base weights: int8 (bitsandbytes LLM.int8), nf4 (4-bit), none", choices=("int8", "nf4", "none")
    )
    dtype: str = _f(
        "auto",
        "dtype of frozen non-quantized weights: auto (bf16 under bf16 autocast, else fp32: fp16 overflows Gemma's "
        "residual stream), bf16, fp16, fp32",
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    attn_implementation: str = _f(
        "gemma_lowmem_sdpa", "attention kernel: gemma_lowmem_sdpa (sdpa, packed rows computed per document), sdpa, "
        "eager, or flash_attention_2 where installed"
    )
    int8_embeddings: bool = _f(
        True, "keep the big embedding tables row-wise int8: the tied embedding/LM head and Gemma 3n's per-layer table"
    )
    embeddings_on_cpu: bool = _f(False, "keep the int8 per-layer embedding table on the CPU when training on a GPU")
    embeddings_on_disk: bool = _f(
        False, "memory-map the int8 per-layer embedding table from a file in the cache folder: only the rows a "
        "batch uses are read into memory (Gemma 3n E2B: 1.9 GB less resident memory)"
    )
    system_role: bool = _f(
        False, "the chat template accepts a system turn; off for Gemma: system text is folded into the first user turn"
    )

    def __post_init__(self) -> None:
        _check_choices(self)


@dataclass
class LoraConfig:
    """The LoRA adapter (PEFT) on the language model's projections."""

    r: int = _f(16, "LoRA rank")
    alpha: int = _f(32, "LoRA alpha (scale = alpha / r)")
    dropout: float = _f(0.05, "dropout on the LoRA input")
    target_modules: list[str] = _f(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "projection names to adapt (language model only)",
    )

    def __post_init__(self) -> None:
        _check_positive("lora.r", self.r)
        if not 0 <= self.dropout < 1:
            raise UserError(f"lora.dropout={self.dropout!r} must be in [0, 1)")
        if not self.target_modules:
            raise UserError("lora.target_modules is empty")


@dataclass
class DataConfig:
    """Which task and data, and how conversations become token rows."""

    task: str = _f(
        "summary_eval", f"task: {', '.join(task_names())}, or one added with tasks.register_task"
    )
    data: str | None = _f(
        None, "data: a local JSONL/CSV/Parquet file, or a hub data set id (default: the task's hub set)"
    )
    train_file: str | None = _f(None, "local training file (overrides --data)")
    val_file: str | None = _f(None, "local validation file (default: a slice held out of the training data)")
    demo: bool = _f(
        False, "use the small demo set bundled in the package (and the bundled Gemma 3 270M unless --model)"
    )
    lang: str = _f("ko", "prompt language: ko (Korean) or en (English)", choices=("ko", "en"))
    max_train_samples: int | None = _f(2000, "at most this many training rows (none: all)")
    max_val_samples: int | None = _f(500, "at most this many validation rows (none: all)")
    max_seq_length: int = _f(2048, "longest conversation in tokens; longer ones get their article cut")
    max_article_length: int = _f(2000, "cut articles to this many characters, at a sentence end")
    no_reference_share: float = _f(
        0.0, "summary_eval: share of conversations whose evaluation request has no reference summary, so the "
        "evaluator learns to grade rows without one (0: always with the reference)"
    )
    score_loss_weight: int = _f(
        1, "summary_eval: each token of a score in the target answer counts this many times in the loss, which is "
        "divided by the weighted token count (1: plain SFT, every answer token once)"
    )
    kinds_per_row: int = _f(
        1, "summary_eval: student summaries written per training article, each of a different kind (1-8); with "
        "several, the grader sees the same article graded high and low and must read the summary to tell them apart "
        "(validation keeps one per row)"
    )
    skip_bad_rows: bool = _f(False, "skip malformed rows (and report how many) instead of stopping")
    cache_dir: str | None = _f(None, "where tokenized data sets are cached (default: ~/.cache/gemma_lowmem)")
    columns: dict[str, str] = _f(
        {}, "read a task field from a column of another name, FIELD=COLUMN pairs: --columns article=text "
        "highlights=reference (local files and hub sets; the error for a missing field names its FIELD)",
        metavar="FIELD=COLUMN",
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        _check_positive("max_train_samples", self.max_train_samples, allow_none=True)
        _check_positive("max_val_samples", self.max_val_samples, allow_none=True)
        _check_positive("max_seq_length", self.max_seq_length)
        _check_positive("max_article_length", self.max_article_length)
        _check_positive("score_loss_weight", self.score_loss_weight)
        if not 1 <= self.kinds_per_row <= 8:
            raise UserError(f"kinds_per_row={self.kinds_per_row!r} must be between 1 and 8 (the summary kinds)")
        if not 0 <= self.no_reference_share <= 1:
            raise UserError(f"no_reference_share={self.no_reference_share!r} must be in [0, 1]")
        for name, column in self.columns.items():
            if not (isinstance(name, str) and name.strip() and "=" not in name and isinstance(column, str)
                    and column.strip()):
                raise UserError(f"columns: {name!r}={column!r} must map a field name to a column name, "
                                "e.g. --columns article=text")


@dataclass
class TrainConfig:
    """The optimisation loop and its memory switches."""

    output_dir: str | None = _f(None, "run folder (default: runs/<timestamp>)")
    seed: int = _f(42, "seed for data order, LoRA init and dropout")
    epochs: float = _f(3, "passes over the training data (stops earlier at --max-steps)")
    max_steps: int | None = _f(None, "stop after this many optimizer steps (none: run all epochs)")
    batch_size: int = _f(2, "rows per micro-batch (per device)")
    grad_accum: int = _f(4, "micro-batches per optimizer step")
    lr: float = _f(2e-4, "peak learning rate (AdamW, LoRA parameters only)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    warmup_ratio: float = _f(0.03, "fraction of steps for linear warmup")
    scheduler: str = _f(
        "cosine",
        "learning-rate schedule after warmup: cosine, linear, constant",
        choices=("cosine", "linear", "constant"),
    )
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this (0: off)")
    precision: str = _f(
        "auto",
        "autocast: auto (bf16 where supported, else fp16 + GradScaler), bf16, fp16, fp32",
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    gradient_checkpointing: bool = _f(True, "recompute each layer's activations in backward (non-reentrant)")
    chunked_loss: bool = _f(True, "chunked LM head + cross-entropy: never builds the full-vocabulary logits")
    loss_chunk_size: int | None = _f(None, "tokens per loss chunk (none: sized to ~256 MB of logits)")
    float_weights: bool | None = _f(
        None, "keep float copies of the frozen int8 linears for the whole run instead of dequantizing them at every "
        "forward, backward and recompute (none: the memory plan keeps them where they fit the budget)"
    )
    packing: bool = _f(True, "pack conversations into full rows (attention never crosses a conversation)")
    pack_len: int | None = _f(None, "tokens per packed row (none: the data's max_seq_length)")
    bucketing: bool = _f(True, "without packing: batch conversations of similar length (less padding)")
    max_bad_steps: int = _f(5, "stop after this many optimizer steps in a row with a non-finite loss or gradient")
    eval_every: int = _f(50, "validation loss every N optimizer steps (0: only at the end)")
    early_stopping_patience: int | None = _f(None, "stop after N validations without improvement (none: off)")
    log_every: int = _f(1, "write a metrics line every N optimizer steps")
    save_every: int = _f(100, "checkpoint every N optimizer steps (0: only at the end)")
    keep_checkpoints: int = _f(2, "keep the last N step checkpoints")
    max_mem: str = _f("8GB", "memory budget for the whole run, e.g. 8GB, 7.5GiB, 8000MB",
                      metavar="SIZE")
    resume: str | None = _f(None, "continue from this checkpoint folder (or a run folder: its latest checkpoint)",
                            metavar="DIR")
    push_to_hub: str | None = _f(None, "push the final adapter to this hub repo (needs network and a token)",
                                 metavar="REPO_ID")

    def __post_init__(self) -> None:
        _check_positive("epochs", self.epochs)
        _check_positive("max_steps", self.max_steps, allow_none=True)
        _check_positive("batch_size", self.batch_size)
        _check_positive("grad_accum", self.grad_accum)
        _check_positive("lr", self.lr)
        _check_choices(self)
        if not 0 <= self.warmup_ratio < 1:
            raise UserError(f"warmup_ratio={self.warmup_ratio!r} must be in [0, 1)")
        _check_positive("loss_chunk_size", self.loss_chunk_size, allow_none=True)
        _check_positive("keep_checkpoints", self.keep_checkpoints)
        _check_positive("pack_len", self.pack_len, allow_none=True)
        _check_positive("max_bad_steps", self.max_bad_steps)


@dataclass
class PreferenceConfig:
    """The objective of the preference task: DPO or IPO against the frozen base as the reference."""

    beta: float = _f(0.1, "DPO/IPO beta, how strongly the policy is held to the reference")
    loss: str = _f("sigmoid", "sigmoid (DPO) or ipo", choices=("sigmoid", "ipo"))
    label_smoothing: float = _f(0.0, "conservative DPO: the chance that a pair's labels are flipped")

    def __post_init__(self) -> None:
        _check_choices(self)
        _check_positive("preference.beta", self.beta)
        if not 0 <= self.label_smoothing < 0.5:
            raise UserError(f"preference.label_smoothing={self.label_smoothing!r} must be in [0, 0.5)")


@dataclass
class EvalConfig:
    """Generation-based evaluation: after training (the demo does it) and in scripts/evaluate.py."""

    evaluate: bool = _f(False, "after training, generate answers for the validation set and write a report (eval/)")
    max_new_tokens: int = _f(384, "longest generated answer in tokens")
    gen_batch_size: int = _f(8, "prompts per generation batch")
    report_examples: int = _f(5, "examples shown in report.md")
    mode: str = _f(
        "guided", "rubric tasks: guided (the code writes the format, the model the scores and texts), scores (score "
        "slots only, fastest), free (plain generation, parsed)", choices=EVAL_MODES,
    )

    def __post_init__(self) -> None:
        _check_choices(self)
        _check_positive("max_new_tokens", self.max_new_tokens)
        _check_positive("gen_batch_size", self.gen_batch_size)
        if self.report_examples < 0:
            raise UserError(f"report_examples={self.report_examples!r} must be >= 0")


@dataclass
class RunConfig:
    """Everything a run needs; saved as ``config.json`` in the run folder and in each checkpoint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> RunConfig:
        """Build from a (possibly partial) nested dict, naming unknown keys and wrong types."""
        if not isinstance(data, dict):
            raise UserError(f"{source}: expected a JSON object with sections {', '.join(SECTIONS)}")
        unknown = set(data) - set(SECTIONS)
        if unknown:
            raise UserError(
                f"{source}: unknown section(s) {', '.join(sorted(unknown))}; expected {', '.join(SECTIONS)}"
            )
        parts = {}
        for name, section_cls in SECTIONS.items():
            values = data.get(name, {})
            if not isinstance(values, dict):
                raise UserError(f"{source}: section '{name}' must be an object")
            known = {f.name: f for f in fields(section_cls)}
            for key, value in values.items():
                if key not in known:
                    raise UserError(f"{source}: unknown key '{name}.{key}'; known: {', '.join(known)}")
                _check_type(f"{source}: {name}.{key}", value, known[key].type)
            parts[name] = section_cls(**values)
        return cls(**parts)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(read_config_file(path), source=str(path))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The (possibly partial) nested dict of a JSON config file, checked for unknown keys and wrong types."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not a valid JSON config ({err})") from None
    RunConfig.from_dict(data, source=str(path))
    return data


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "lora": LoraConfig, "data": DataConfig, "train": TrainConfig,
    "preference": PreferenceConfig, "eval": EvalConfig,
}


def field_type(annotation: Any) -> tuple[type, bool]:
    """A config field's annotation as (base type, whether None is allowed).

    ``int | None`` -> ``(int, True)``; ``list[str]`` -> ``(list, False)``. Annotations are strings here (postponed
    evaluation), read against the names of ``typing``.
    """
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation  # noqa: S307 (own code)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner[0], True
    return typing.get_origin(hint) or hint, False


def _check_type(where: str, value: Any, annotation: Any) -> None:
    """Check a config value against its field annotation (``int``, ``float | None``, ``list[str]``...)."""
    base, optional = field_type(annotation)
    if value is None and optional:
        return
    expected = (int, float) if base is float else (base,)
    if not isinstance(value, expected) or (isinstance(value, bool) and base is not bool):
        raise UserError(f"{where}={value!r} has the wrong type: expected {base.__name__}")
