"""gemma-lowmem: hand-written low-memory LoRA training for 8-bit Gemma (and any Hugging Face causal LM)."""

from gemma_lowmem.config import DataConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig
from gemma_lowmem.data.conversation import Conversation
from gemma_lowmem.data.tokenize import encode_conversations
from gemma_lowmem.errors import UserError
from gemma_lowmem.loss import sft_loss
from gemma_lowmem.model import add_lora, load_adapter, load_base_model, load_tokenizer
from gemma_lowmem.train import FitResult, fit

__all__ = [
    "Conversation",
    "DataConfig",
    "FitResult",
    "LoraConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "UserError",
    "add_lora",
    "encode_conversations",
    "fit",
    "load_adapter",
    "load_base_model",
    "load_tokenizer",
    "sft_loss",
]
