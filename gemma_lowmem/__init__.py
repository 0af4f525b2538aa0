"""gemma-lowmem: hand-written low-memory LoRA training for 8-bit Gemma (and any Hugging Face causal LM).

The public names load lazily, so ``import gemma_lowmem.evaluation`` does not pull in torch and transformers.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

# On CPUs with AVX-512 bf16, importing bitsandbytes tries to fetch an nf4 kernel from the hub through Hugging Face's
# `kernels` package and logs a warning when it cannot (offline, or the package absent): the int8 path never uses it.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_EXPORTS = {
    "DataConfig": "gemma_lowmem.config",
    "LoraConfig": "gemma_lowmem.config",
    "ModelConfig": "gemma_lowmem.config",
    "RunConfig": "gemma_lowmem.config",
    "TrainConfig": "gemma_lowmem.config",
    "Conversation": "gemma_lowmem.data.conversation",
    "encode_conversations": "gemma_lowmem.data.tokenize",
    "UserError": "gemma_lowmem.errors",
    "sft_loss": "gemma_lowmem.loss",
    "add_lora": "gemma_lowmem.model",
    "load_adapter": "gemma_lowmem.model",
    "load_base_model": "gemma_lowmem.model",
    "load_tokenizer": "gemma_lowmem.model",
    "FitResult": "gemma_lowmem.train",
    "fit": "gemma_lowmem.train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gemma_lowmem' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
