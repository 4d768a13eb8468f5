"""T5 relative position bias (Raffel et al. 2020, sec. 2.1): a learned scalar
per (bucket, head) added to the logits, with relative distances mapped to
log-spaced buckets. Bucketing follows the Mesh TensorFlow reference
(mesh_tensorflow/transformer/transformer_layers.py ``_relative_position_bucket``,
also transformers' T5Attention): half the buckets are exact distances, the rest
log-spaced up to ``max_distance``, beyond which all share the last bucket.
The decoder uses ``bidirectional=False``. One bias table is shared by all layers
(as in T5, where layer 0 computes it and the others reuse it).
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from posenc.base import PositionalEncoding, register


def relative_position_bucket(relative_position, bidirectional=True, num_buckets=32,
                             max_distance=128):
  """Bucket ids for relative_position = key_pos - query_pos (int array, any shape)."""
  n = -jnp.asarray(relative_position)
  ret = jnp.zeros_like(n)
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(n.dtype) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # log-spaced buckets: max_exact + log(n / max_exact) / log(max_distance / max_exact)
  #                                * (num_buckets - max_exact), truncated toward zero
  scaled = (jnp.log(n.astype(jnp.float32) / max_exact + jnp.finfo(jnp.float32).eps)
            / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  large = jnp.minimum(max_exact + scaled.astype(n.dtype), num_buckets - 1)
  return ret + jnp.where(is_small, n, large)


@register("t5_bias")
class T5Bias(PositionalEncoding):
  """Learned bucketed relative bias, one table [num_buckets, heads]."""

  relative = True

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        num_buckets=32,  # T5 default
        max_distance=128,  # distances >= this share the last bucket
        bidirectional=False,  # causal decoder: only key_pos <= query_pos matter
    ))

  def __init__(self, config, model_config, *, rngs):
    super().__init__(config, model_config, rngs=rngs)
    # transformers' T5 init: normal(std = d_model^-0.5) for relative_attention_bias
    init = jax.nn.initializers.normal(model_config.d_model ** -0.5)
    self.embedding = nnx.Param(init(rngs.params(), (config.num_buckets, model_config.num_heads)))

  def distance_bias(self, max_distance=None):
    """Causal buckets depend only on n = max(i - j, 0) and are the last one from some n on
    (bucket ids never decrease with n): the table over n = 0 .. (first n in the last bucket)
    is exact for any distance. None where bidirectional or never saturating (max_distance
    <= num_buckets / 2)."""
    del max_distance  # exact at any distance: no bound needed
    if self.config.bidirectional:
      return None
    nb, md = self.config.num_buckets, self.config.max_distance
    with jax.ensure_compile_time_eval():  # config-only: concrete even under jit
      buckets = np.asarray(relative_position_bucket(-jnp.arange(2 * md + 1), False, nb, md))
    last = np.flatnonzero(buckets == nb - 1)
    if md <= nb // 2 or not len(last):
      return None
    table = jnp.take(self.embedding[...], jnp.asarray(buckets[:last[0] + 1]), axis=0)
    return None, table.T  # [h, T]

  def bias(self, q_pos, k_pos):
    rel = k_pos[:, None, :] - q_pos[:, :, None]  # [b, sq, sk]
    buckets = relative_position_bucket(rel, self.config.bidirectional, self.config.num_buckets,
                                       self.config.max_distance)
    values = jnp.take(self.embedding[...], buckets, axis=0)  # [b, sq, sk, h]
    return jnp.transpose(values, (0, 3, 1, 2))
