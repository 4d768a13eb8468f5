"""Sinusoidal absolute encoding (Vaswani et al. 2017, sec. 3.5):

  PE(pos, 2i)   = sin(pos / 10000^(2i / d))
  PE(pos, 2i+1) = cos(pos / 10000^(2i / d))

added to the token embeddings. Computed on the fly in float32 from the integer
positions, so any position works (no table).
"""
import jax.numpy as jnp
import ml_collections

from posenc.base import PositionalEncoding, register


def sinusoidal_table(positions, dim, base=10000.0):
  """PE for integer positions [...] -> [..., dim] (float32), interleaved sin/cos as eq. in sec. 3.5."""
  inv_freq = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return pe.reshape(*positions.shape, dim)


@register("sinusoidal")
class Sinusoidal(PositionalEncoding):
  """Adds fixed sinusoids to the token embeddings."""

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        base=10000.0,  # wavelength base of eq. sec. 3.5
        # Amplitude of the sinusoids; 0 = d_model^-0.5, the paper's ratio (sec. 3.4: the
        # embedding, initialised N(0, 1/d) in tensor2tensor, is multiplied by sqrt(d) and
        # the sinusoids have amplitude 1; divided through by sqrt(d): embedding + PE/sqrt(d)).
        # Matched to lenx's 0.02 *initial* embedding instead (0.03), the trained embeddings
        # (RMS 0.1-0.25 after 1-1.4M tokens) swamped the position signal 5-12x and
        # sinusoidal fit 2.006 nats vs 1.803 at d^-0.5 (results/demo/README.md).
        scale=0.0,
    ))

  @classmethod
  def finalize_config(cls, own, config):
    if own.scale < 0:
      raise ValueError(f"posenc.sinusoidal.scale must be >= 0 (0 = d_model^-0.5), got {own.scale}")
    if own.scale == 0:
      own.scale = config.model.d_model ** -0.5

  def embed(self, x, positions):
    pe = sinusoidal_table(positions, self.d_model, self.config.base)
    scale = self.config.scale or self.d_model ** -0.5  # 0 also when built unresolved
    return x + scale * pe.astype(x.dtype)
