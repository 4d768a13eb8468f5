"""CoPE, Contextual Position Encoding (Golovneva et al. 2024, arXiv 2405.18719, sec. 3):
positions are counted by the content instead of read from position ids.

For query i and key j <= i (q already scaled by 1/sqrt(head_dim), as in attention):
    g_ij = sigmoid(q_i . k_j)                       gates, from the attention logits
    p_ij = sum_{t=j..i} g_it                        how many "counted" keys lie in [j, i]
    p_ij <- min(p_ij, npos - 1)                     clamp to the embedding table
    z_ij = (1 - w) q_i . e[floor p] + w q_i . e[ceil p],   w = p - floor p
    logits_ij = q_i . k_j + z_ij
Follows the reference code (github facebookresearch/RAM, ``projects/cope/src/cope/
context_position.py``, ``ContextPosSelfAttn``): gates from the same q.k logits
(default ``--no-cope-sep-key``), p as the reverse cumulative sum of masked gates,
clamp ``max=npos-1``, q.e computed for all npos integer positions then gathered at
floor/ceil (no gradient through the indices, gradient through w), embeddings
[npos, head_dim] initialised to zeros and shared by the heads. The reference divides
(q.k + q.e) by sqrt(head_dim) at the end; here q arrives pre-scaled, which is the same.
Its npos defaults to block size + 1 (``npos = 0`` here); our default is 64.

Position ids are read only to keep a key after the query out of its count (for sorted
ids, which every forward uses, the causal mask already does), so the logits are invariant
to shifting them (``relative = True``) and randomized training positions do not affect
CoPE. One instance is shared by all layers (like the reference's ``--cope-shared``; its
default is one table per layer).

Blockwise evaluation cannot serve CoPE: p_ij sums the gates of every key between j
and i, i.e. a query's whole row. ``blockwise = False`` makes long evaluation take the
full path (an L x L matrix per head) instead of silently computing block-local counts.
"""
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from posenc.base import PositionalEncoding, qk_dot, register

__all__ = ["CoPE", "cope_positions", "interpolate_position_logits"]


def causal_gate_mask(sq, sk):
  """[sq, sk] bool: key index <= query index (queries are the last sq of sk keys)."""
  return jnp.arange(sk)[None, :] <= jnp.arange(sq)[:, None] + (sk - sq)


def cope_positions(gate_logits, npos, keep=True):
  """Contextual positions p [b, h, sq, sk] from logits q.k [b, h, sq, sk] (float32).

  p_ij = sum over keys t in [j, i] of sigmoid(logit_it), clamped to npos - 1; 0 where
  j > i (masked keys contribute no gate). ``keep`` (bool, broadcast to the logits): the
  keys that may contribute a gate at all (``CoPE.scores``).
  """
  sq, sk = gate_logits.shape[-2:]
  gates = jax.nn.sigmoid(gate_logits) * (causal_gate_mask(sq, sk) & keep)
  p = jnp.flip(jnp.cumsum(jnp.flip(gates, -1), axis=-1), -1)  # sum_{t >= j}
  return jnp.minimum(p, npos - 1)


def interpolate_position_logits(q, table, p):
  """z_ij = q_i . e[p_ij], linear between e[floor p] and e[ceil p].

  q [b, sq, h, d], table [npos, d], p [b, h, sq, sk] -> [b, h, sq, sk] float32.
  """
  fixed = jnp.einsum("bqhd,nd->bhqn", q, table.astype(q.dtype),
                     preferred_element_type=jnp.float32)  # q . e[n] for every n
  lo = jax.lax.stop_gradient(jnp.floor(p))
  hi = jax.lax.stop_gradient(jnp.ceil(p))
  z_lo = jnp.take_along_axis(fixed, lo.astype(jnp.int32), axis=-1)
  z_hi = jnp.take_along_axis(fixed, hi.astype(jnp.int32), axis=-1)
  w = p - lo  # differentiable in p (and so in the gates)
  return z_hi * w + z_lo * (1.0 - w)


@register("cope")
class CoPE(PositionalEncoding):
  """Content-counted positions with an [npos, head_dim] embedding table."""

  blockwise = False  # p_ij needs the gates of the whole row (see module docstring)
  relative = True  # position ids are not used at all

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        npos=64,  # embedding rows; counts clamp at npos - 1. 0 = train_len + 1 (reference)
    ))

  @classmethod
  def finalize_config(cls, own, config):
    if own.npos == 0:
      own.npos = config.train_len + 1
    if own.npos < 2:
      raise ValueError(f"posenc.cope.npos must be >= 2 (or 0 = train_len + 1), got {own.npos}")

  def __init__(self, config, model_config, *, rngs):
    super().__init__(config, model_config, rngs=rngs)
    if config.npos < 2:
      raise ValueError(f"posenc.cope.npos must be >= 2, got {config.npos} (0 is only "
                       "resolved by configs.common.resolve)")
    self.npos = int(config.npos)
    self.table = nnx.Param(jnp.zeros((self.npos, model_config.head_dim), jnp.float32))

  def scores(self, q, k, q_pos, k_pos):
    logits = qk_dot(q, k)
    # Gates only from keys at or before the query's position: for the sorted ids of every
    # forward the index mask already implies it; it masks a KV cache's empty slots and a
    # decoded chunk's later tokens, which lie after the query (``models.generate``).
    p = cope_positions(logits, self.npos, k_pos[:, None, None, :] <= q_pos[:, None, :, None])
    return logits + interpolate_position_logits(q, self.table[...], p)
