"""Decoder-only byte LM (nanoGPT-sized, Llama-shaped): token embedding ->
N pre-norm blocks (attention + MLP) -> final norm -> output head.

Positions are always explicit integer arrays [batch, seq]; nothing assumes
arange, so offset, randomized and extended positions work everywhere.
"""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import posenc
from models.attention import Attention
from models.layers import (MLP, MLP_CHUNK, Dense, compute_dtype, dropout, make_norm, map_chunks,
                           mixed_dot_t)


class Block(nnx.Module):
  """x + Attn(Norm(x)), then x + MLP(Norm(x))."""

  def __init__(self, cfg, *, rngs):
    self.attn_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)
    self.dropout_rate = cfg.dropout
    self.mlp_chunk = cfg.get("mlp_chunk", MLP_CHUNK)  # configs written before the knob lack it

  def __call__(self, x, positions, enc, rng=None, *, with_stats=False):
    rngs = jax.random.split(rng) if rng is not None else (None, None)
    h, stats = self.attn(self.attn_norm(x), positions, enc, with_stats=with_stats)
    x = x + dropout(h, self.dropout_rate, rngs[0])
    h = map_chunks(lambda t: self.mlp(self.mlp_norm(t)), x, self.mlp_chunk)
    x = x + dropout(h, self.dropout_rate, rngs[1])
    return x, stats


class DecoderLM(nnx.Module):
  """The language model; ``posenc`` is one encoding instance shared by all layers."""

  def __init__(self, model_cfg, posenc_cfg, *, rngs):
    self.embedding = nnx.Param(
        jax.nn.initializers.normal(0.02)(rngs.params(), (model_cfg.vocab_size, model_cfg.d_model)))
    self.posenc = posenc.build(posenc_cfg, model_cfg, rngs=rngs)
    self.blocks = nnx.List([Block(model_cfg, rngs=rngs) for _ in range(model_cfg.num_layers)])
    self.final_norm = make_norm(model_cfg.norm, model_cfg.d_model, eps=model_cfg.norm_eps,
                                rngs=rngs)
    self.head = None if model_cfg.tie_embeddings else Dense(
        model_cfg.d_model, model_cfg.vocab_size, dtype=model_cfg.dtype, rngs=rngs)
    self.dtype = model_cfg.dtype
    self.dropout_rate = model_cfg.dropout
    self.remat = model_cfg.get("remat", False)  # configs written before the knob lack it

  def check_positions(self, positions):
    """Eager check (skipped under jit) that the encoding supports these positions."""
    if not isinstance(positions, jax.core.Tracer):
      self.posenc.check_positions(int(np.max(np.asarray(positions))))  # numpy: fine inside a trace

  def embed(self, tokens, positions):
    """The first block's input [b, s, d]: token embeddings plus any absolute encoding."""
    self.check_positions(positions)
    return self.posenc.embed(jnp.take(self.embedding[...], tokens, axis=0), positions)

  def features(self, tokens, positions, *, dropout_rng=None, with_stats=False):
    """Final-norm hidden states [b, s, d] (float32), plus per-layer attention stats."""
    x = self.embed(tokens, positions)
    rngs = jax.random.split(dropout_rng, len(self.blocks) + 1) if dropout_rng is not None else None
    x = dropout(x, self.dropout_rate, None if rngs is None else rngs[-1])
    if self.remat and not with_stats:
      return self.final_norm(self._remat_blocks(x, positions, rngs)), [None] * len(self.blocks)
    stats = []
    for i, block in enumerate(self.blocks):
      x, s = block(x, positions, self.posenc, None if rngs is None else rngs[i],
                   with_stats=with_stats)
      stats.append(s)
    return self.final_norm(x), stats

  def _remat_blocks(self, x, positions, rngs):
    """The blocks as a scan over their stacked parameters, each recomputed in the
    backward pass: only each block's input is saved, what lets a 16k-token fine-tune
    of a 30-layer checkpoint fit in memory. A scan, not per-block ``jax.checkpoint``:
    XLA:CPU drops the optimisation barriers that keep a straight-line recompute from
    being merged back into the forward pass (measured: same dot count, same memory),
    while a recompute inside the backward loop cannot be merged."""
    graphdef = nnx.graphdef(self.blocks[0])
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *(nnx.state(b) for b in self.blocks))
    enc = self.posenc

    @jax.checkpoint
    def body(h, state_rng):
      state, rng = state_rng
      return nnx.merge(graphdef, state)(h, positions, enc, rng)[0], None

    layer_rngs = None if rngs is None else rngs[:len(self.blocks)]
    return jax.lax.scan(body, x, (stacked, layer_rngs))[0]

  def logits(self, h):
    """Output head on hidden states [..., d] -> [..., vocab] float32."""
    if self.head is not None:
      return self.head(h)
    return mixed_dot_t(h, self.embedding[...], compute_dtype(self.dtype))  # tied: h E^T

  def __call__(self, tokens, positions, *, dropout_rng=None):
    h, _ = self.features(tokens, positions, dropout_rng=dropout_rng)
    return self.logits(h)


def build_model(config, seed=None):
  """DecoderLM from a full lenx config (``config.model``, ``config.posenc``)."""
  seed = config.seed if seed is None else seed
  return DecoderLM(config.model, config.posenc, rngs=nnx.Rngs(params=seed))
