"""Relative position representations (Shaw, Uszkoreit & Vaswani 2018,
arXiv 1803.02155, eq. 3-5): the logit of query i and key j gains q_i . a^K_ij,

  e_ij = q_i (k_j + a^K_ij)^T / sqrt(d)                                   (eq. 4)
  a^K_ij = w^K_{clip(j - i, k)},  clip(x, k) = max(-k, min(k, x))         (eq. 5)

with one learned table w^K [2k+1, head_dim] shared by all heads (sec. 3.3,
"shared across attention heads"). The 1/sqrt(d) comes for free: the attention
module scales q by 1/sqrt(head_dim) before calling ``scores``.

Computed as in the paper's efficient form (sec. 3.3): q @ w^K^T gives
[b, h, sq, 2k+1] per block, then each (i, j) gathers its clipped index, so no
[sq, sk, d] tensor is built and any block of positions works.

Initialisation follows tensor2tensor (common_attention.py
``_generate_relative_positions_embeddings``, a plain ``tf.get_variable`` under the
t2t default initializer ``uniform_unit_scaling``, gain 1): uniform in
+-sqrt(3 / (2k+1)).

Left out: the value term a^V of eq. 3 (in the paper's ablation a^K alone does
as well as a^K + a^V); it would need a new hook inside the attention module's
weighted sum of values. Also, lenx shares one encoding by all layers, so one
table serves every layer (the paper has one per layer).
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from posenc.base import PositionalEncoding, qk_dot, register


def clipped_relative_index(q_pos, k_pos, max_distance):
  """clip(j - i, k) + k in [0, 2k] for positions q [b, sq], k [b, sk] -> [b, sq, sk]."""
  rel = k_pos[:, None, :].astype(jnp.int32) - q_pos[:, :, None].astype(jnp.int32)
  return jnp.clip(rel, -max_distance, max_distance) + max_distance


def relative_key_logits(q, table, index):
  """q_i . table[index_ij]: q [b, sq, h, d], table [n, d], index [b, sq, sk] -> [b, h, sq, sk]."""
  per_row = jnp.einsum("bqhd,nd->bhqn", q, table.astype(q.dtype),
                       preferred_element_type=jnp.float32)  # [b, h, sq, 2k+1]
  idx = jnp.broadcast_to(index[:, None], (index.shape[0], q.shape[2]) + index.shape[1:])
  return jnp.take_along_axis(per_row, idx, axis=-1)


@register("shaw")
class Shaw(PositionalEncoding):
  """Learned relative key embeddings a^K_{clip(j-i, k)} (eq. 4-5)."""

  relative = True

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        max_distance=16,  # k of eq. 5: distances beyond +-k share the edge embedding (paper: 16)
    ))

  @classmethod
  def finalize_config(cls, own, config):
    if not isinstance(own.max_distance, int) or own.max_distance < 1:
      raise ValueError(
          f"posenc.shaw.max_distance must be an integer >= 1, got {own.max_distance!r}")

  def __init__(self, config, model_config, *, rngs):
    super().__init__(config, model_config, rngs=rngs)
    k = config.max_distance
    limit = math.sqrt(3.0 / (2 * k + 1))  # t2t uniform_unit_scaling, fan-in = 2k+1
    self.rel_key = nnx.Param(jax.random.uniform(
        rngs.params(), (2 * k + 1, model_config.head_dim), jnp.float32, -limit, limit))

  def scores(self, q, k, q_pos, k_pos):
    index = clipped_relative_index(q_pos, k_pos, self.config.max_distance)
    return qk_dot(q, k) + relative_key_logits(q, self.rel_key[...], index)
