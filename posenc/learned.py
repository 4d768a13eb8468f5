"""Learned absolute position embeddings (GPT-2 / BERT style; Gehring et al. 2017):
a trainable table of ``max_len`` rows, row p added to the embedding of the token
at position p.

Positions past the table are an error. Eager calls raise a ValueError before any
compute (``check_positions``); under jit, where positions are traced, an
out-of-range lookup yields NaN (``jnp.take(mode="fill")``) instead of silently
clamping to the last row, so a misuse can never pass for a result.
"""
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from posenc.base import PositionalEncoding, register


@register("learned")
class Learned(PositionalEncoding):
  """Trainable table [max_len, d_model], init N(0, 0.02^2) like GPT-2."""

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        max_len=2048,  # rows of the table: positions 0..max_len-1
        init_std=0.02,  # GPT-2 initialisation of wpe
    ))

  def __init__(self, config, model_config, *, rngs):
    super().__init__(config, model_config, rngs=rngs)
    init = jax.nn.initializers.normal(config.init_std)
    self.table = nnx.Param(init(rngs.params(), (config.max_len, model_config.d_model)))

  @property
  def max_position(self):
    return self.config.max_len - 1

  def embed(self, x, positions):
    pe = jnp.take(self.table[...], positions, axis=0, mode="fill", fill_value=jnp.nan)
    return x + pe.astype(x.dtype)
