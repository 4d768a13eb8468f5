"""ALiBi (Press et al. 2022, "Train Short, Test Long", sec. 3): no position
embeddings; each head h adds -m_h * (i - j) to the logit of query i, key j.

Slopes follow the reference code (ofirpress/attention_with_linear_biases,
fairseq/models/transformer.py ``get_slopes``): for n a power of two, the
geometric sequence starting at 2^(-8/n) with ratio 2^(-8/n); otherwise the slopes
of the closest lower power of two, then every other slope of twice that count.
"""
import math

import jax.numpy as jnp
import numpy as np

from posenc.base import PositionalEncoding, register


def _power_of_two_slopes(n):
  start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))  # = 2^(-8/n)
  return [start * start**i for i in range(n)]


def alibi_slopes(num_heads):
  """One slope per head, float32 [num_heads]; 8 heads -> 1/2, 1/4, ..., 1/256."""
  if num_heads < 1:
    raise ValueError(f"num_heads must be >= 1, got {num_heads}")
  if math.log2(num_heads).is_integer():
    return np.asarray(_power_of_two_slopes(num_heads), np.float32)
  closest = 2 ** math.floor(math.log2(num_heads))
  extra = alibi_slopes(2 * closest)[0::2][: num_heads - closest]
  return np.concatenate([alibi_slopes(closest), extra]).astype(np.float32)


@register("alibi")
class ALiBi(PositionalEncoding):
  """Linear distance penalty per head; parameter-free."""

  relative = True

  def distance_bias(self, max_distance=None):  # exact at any distance: no bound needed
    del max_distance
    return jnp.asarray(alibi_slopes(self.num_heads)), None  # -m_h |i - j|, as ``bias``

  def bias(self, q_pos, k_pos):
    slopes = self.distance_bias()[0][None, :, None, None]
    distance = jnp.abs(q_pos[:, None, :, None] - k_pos[:, None, None, :]).astype(jnp.float32)
    return -slopes * distance
