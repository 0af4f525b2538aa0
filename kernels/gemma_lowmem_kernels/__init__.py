"""Memory-saving kernels in plain PyTorch, each with a reference implementation that is its specification.

- :func:`linear_cross_entropy`: the LM head's cross-entropy computed a chunk of tokens at a time, so the
  (tokens, vocab) logits never exist whole (:func:`linear_cross_entropy_ref` is the full-logits version).
- :class:`Int8Embedding`: a frozen embedding table stored as row-wise int8 (:func:`quantize_rows`) that can
  stay on the CPU while the model runs elsewhere (:func:`int8_embedding_ref` is the quantize-dequantize version).
- :func:`int8_linear`: a frozen row-wise int8 linear whose backward saves no input, so checkpointing can drop it
  (:func:`int8_linear_ref` dequantizes the whole weight and calls ``F.linear``).

Nothing here imports ``gemma_lowmem``.
"""

from gemma_lowmem_kernels.int8_embedding import Int8Embedding, int8_embedding_ref, quantize_rows
from gemma_lowmem_kernels.int8_linear import int8_linear, int8_linear_ref
from gemma_lowmem_kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref

__all__ = [
    "Int8Embedding",
    "int8_embedding_ref",
    "int8_linear",
    "int8_linear_ref",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "quantize_rows",
]
