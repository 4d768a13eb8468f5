"""Dual Chunk Attention (An et al. 2024, "Training-Free Long-Context Scaling of Large
Language Models", arXiv 2402.17463, sec. 3; reference HKUNLP/ChunkLlama
``chunkllama_attn_replace.py``).

The sequence is cut into chunks of s = chunk_size - local_window positions; keys sit at
k mod s, and a query gets one of three positions depending on where the key is:

  intra-chunk (same chunk):        q mod s
  successive  (the previous chunk): min(q mod s + s, chunk_size)
  inter-chunk (any earlier chunk):  min(2 s - 1, chunk_size)   (the reference's constant)

so every distance stays <= chunk_size < the pre-training length, while neighbouring
tokens across a chunk border keep their true distance (successive part). Defaults as the
reference's ``replace_with_chunkllama``: chunk_size = 3/4 and local_window = 1/16 of the
pre-training length (train_len).
"""
from extensions import register
from extensions.piecewise import PiecewiseRoPE, const, positive_int

import jax.numpy as jnp


@register("dual_chunk")
class DualChunk(PiecewiseRoPE):
  keys = ("chunk_size", "local_window")

  def resolve(self, params, config, eval_len):
    chunk = positive_int(params, "chunk_size", config.train_len * 3 // 4, minimum=2)
    local = positive_int(params, "local_window", max(1, config.train_len // 16))
    if local >= chunk:
      raise ValueError(f"dual_chunk local_window={local} must be < chunk_size={chunk}")
    return {"chunk_size": chunk, "local_window": local}

  def parts(self, p):
    c = p["chunk_size"]
    s = c - p["local_window"]
    key = lambda k: k % s
    return [(lambda q: q % s, key),  # intra
            (lambda q: jnp.minimum(q % s + s, c), key),  # successive
            (const(min(2 * s - 1, c)), key)]  # inter

  def select(self, p, q_pos, k_pos):
    s = p["chunk_size"] - p["local_window"]
    behind = q_pos // s - k_pos // s  # chunks between query and key
    return jnp.minimum(behind, 2).astype(jnp.int32)

  def kernel_form(self, p):
    return p["chunk_size"] - p["local_window"], 0, 3
