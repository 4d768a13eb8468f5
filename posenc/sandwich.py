"""Sandwich (Chi, Fan, Rudnicky & Ramadge 2023, "Dissecting Transformer Length
Extrapolation via the Lens of Receptive Field Analysis", arXiv 2212.10356,
sec. 5): a parameter-free bias from the inner product of sinusoidal position
embeddings p_m . p_n = sum_{i=1}^{d/2} cos((m - n) / 10000^(2i/d)), shifted so
that it is 0 at distance 0 (and <= 0 elsewhere) and compressed per head like
ALiBi's slopes:

  bias_h(m, n) = (p_m . p_n - d/2) / (8 h / H),   h = 1..H

Follows the reference implementation NVIDIA NeMo
``megatron/position_embedding/sandwich_relative_position_embedding.py``:
frequency index i runs 1..d/2 (not 0..d/2-1), d is the per-head width
(``hidden_size // num_attention_heads``), divisor 8h/H.

Computed as the inner product it is defined by, p_m . p_n with
p = [cos(t w), sin(t w)] (cos a cos b + sin a sin b = cos(a - b)), one [sq, d] x
[d, sk] matmul per block instead of a [sq, sk, d/2] tensor of cosines.
Positions are first taken relative to the block's first query position
(exact: the bias depends only on m - n), which keeps float32 angles small.
"""
import jax.numpy as jnp
import ml_collections
import numpy as np

from posenc.base import PositionalEncoding, register


def sandwich_head_scales(num_heads):
  """1 / (8h / H) for h = 1..H (NeMo ``bias_scales * 8 / num_attention_heads``), float32 [H]."""
  if num_heads < 1:
    raise ValueError(f"num_heads must be >= 1, got {num_heads}")
  h = np.arange(1, num_heads + 1, dtype=np.float64)
  return (num_heads / (8.0 * h)).astype(np.float32)


def sandwich_features(t, dim, base=10000.0):
  """p_t = [cos(t w_i), sin(t w_i)], w_i = base^(-2i/dim), i = 1..dim/2: [..., dim] float32."""
  inv_freq = 1.0 / (base ** (2.0 * jnp.arange(1, dim // 2 + 1, dtype=jnp.float32) / dim))
  angles = t.astype(jnp.float32)[..., None] * inv_freq
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def sandwich_bias(q_pos, k_pos, num_heads, dim, base=10000.0):
  """[b, h, sq, sk] bias for positions q [b, sq], k [b, sk]."""
  origin = q_pos[:, :1]
  pq = sandwich_features(q_pos - origin, dim, base)
  pk = sandwich_features(k_pos - origin, dim, base)
  inner = jnp.einsum("bqr,bkr->bqk", pq, pk, preferred_element_type=jnp.float32)
  scales = jnp.asarray(sandwich_head_scales(num_heads))[None, :, None, None]
  # inner <= dim/2 exactly, but rounding can overshoot by ~1e-6; clamp keeps bias <= 0
  return jnp.minimum(inner - dim / 2, 0.0)[:, None] * scales


@register("sandwich")
class Sandwich(PositionalEncoding):
  """Parameter-free sinusoidal inner-product bias, ALiBi-style per-head compression."""

  relative = True

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        dim=0,  # d of the sinusoids (even); 0 = head_dim as NeMo's reference
        base=10000.0,  # wavelength base of the sinusoids
    ))

  @classmethod
  def finalize_config(cls, own, config):
    if own.dim < 0 or own.dim % 2:
      raise ValueError(f"posenc.sandwich.dim must be 0 (= head_dim) or a positive even integer, "
                       f"got {own.dim}")

  def __init__(self, config, model_config, *, rngs):
    super().__init__(config, model_config, rngs=rngs)
    self.dim = config.dim or model_config.head_dim
    if self.dim % 2:
      raise ValueError(
          f"sandwich needs an even dim, got head_dim {self.dim}; set posenc.sandwich.dim")

  def distance_bias(self, max_distance=None):
    """The bias at distances 0..max_distance as a table (``PositionalEncoding``): the cosine
    sum never settles, so there is no finite table without a bound."""
    if max_distance is None:
      return None
    origin, keys = jnp.zeros((1, 1), jnp.int32), jnp.arange(max_distance + 1)[None]
    return None, self.bias(origin, keys)[0, :, 0, :]  # [h, T]; cos is even: bias(i - j)

  def bias(self, q_pos, k_pos):
    return sandwich_bias(q_pos, k_pos, self.num_heads, self.dim, self.config.base)
