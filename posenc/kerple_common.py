"""Shared math of the KERPLE encodings (Chi et al. 2022, "KERPLE: Kernelized Relative
Positional Embedding for Length Extrapolation", arXiv 2205.09921). Registers nothing;
``kerple_log`` and ``kerple_power`` build on it.

KERPLE adds a conditionally positive definite kernel of the distance |m - n| to the
logits, with two positive learnable scalars per head (r1, r2). The reference code
(github chijames/KERPLE, ``megatron/mpu/layers.py``, classes ``ParallelKerpleLog`` and
``ParallelKerplePower``) keeps them positive by clamping the stored parameters in
place (``param.data.clamp_(min=eps)``, eps = 1e-2) before every forward pass.
"""
import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from posenc.base import PositionalEncoding

EPS = 1e-2  # reference: self.eps = 1e-2


def clamp_ste(x, lo, hi=None):
  """clip(x, lo, hi) in the forward pass with the identity gradient.

  The reference projects the parameter itself back into [lo, hi] after each step, so
  the gradient is always taken at the clamped value and a parameter that reaches the
  bound can leave it again. A plain ``jnp.clip`` would give zero gradient below the
  bound (the parameter could stick there forever); the straight-through clamp keeps
  the reference's forward value and still lets the gradient move the parameter.
  """
  y = jnp.clip(x, lo, hi)
  return x + jax.lax.stop_gradient(y - x)


def abs_distance(q_pos, k_pos):
  """|m - n| as float32 [b, 1, sq, sk] from positions q_pos [b, sq], k_pos [b, sk]."""
  d = q_pos[:, None, :, None] - k_pos[:, None, None, :]
  return jnp.abs(d).astype(jnp.float32)


def log_kernel_bias(r1, r2, distance):
  """KERPLE-log: -r1 * log(1 + r2 * d); r1, r2 [h] (already positive), d [b, 1, sq, sk]."""
  r1, r2 = r1[None, :, None, None], r2[None, :, None, None]
  return -r1 * jnp.log1p(r2 * distance)


def power_kernel_bias(r1, r2, distance):
  """KERPLE-power: -r1 * d^r2 with 0 < r2 <= 2; d^r2 = 0 at d = 0 (finite gradient)."""
  r1, r2 = r1[None, :, None, None], r2[None, :, None, None]
  positive = distance > 0
  safe = jnp.where(positive, distance, 1.0)  # log(0) would make the r2-gradient NaN
  return -r1 * jnp.where(positive, jnp.exp(r2 * jnp.log(safe)), 0.0)


class KerpleBase(PositionalEncoding):
  """Two per-head parameters, uniform init U(0, scale) like the reference's
  ``get_parameter(scale, 'uniform')`` (torch.rand * scale); subclasses give the kernel.

  One instance is shared by all layers (this codebase's convention); the reference
  builds one module per attention layer.
  """

  relative = True
  # (scale of r1's init, scale of r2's init, upper clamp of r2 or None): set by subclasses
  r1_init_scale = 1.0
  r2_init_scale = 1.0
  r2_max = None

  def __init__(self, config, model_config, *, rngs):
    super().__init__(config, model_config, rngs=rngs)
    h = model_config.num_heads
    self.r1 = nnx.Param(jax.random.uniform(rngs.params(), (h,)) * self.r1_init_scale)
    self.r2 = nnx.Param(jax.random.uniform(rngs.params(), (h,)) * self.r2_init_scale)

  def constrained(self):
    """(r1, r2) after the reference's positivity clamps, [h] each."""
    eps = self.config.eps
    return clamp_ste(self.r1[...], eps), clamp_ste(self.r2[...], eps, self.r2_max)

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        eps=EPS,  # lower clamp of r1 and r2 (reference: 1e-2)
    ))

  @classmethod
  def finalize_config(cls, own, config):
    del config
    upper = cls.r2_max if cls.r2_max is not None else float("inf")
    if not 0 < own.eps < upper:
      raise ValueError(f"posenc.{cls.name}.eps must be in (0, {upper}), got {own.eps}")

  def kernel(self, r1, r2, distance):
    raise NotImplementedError

  def distance_bias(self, max_distance=None):
    """The kernel at distances 0..max_distance as a table (``PositionalEncoding``): exact
    up to the bound; KERPLE's kernels grow without limit, so there is no table without one."""
    if max_distance is None:
      return None
    distance = jnp.arange(max_distance + 1, dtype=jnp.float32)[None, None, None, :]
    return None, self.kernel(*self.constrained(), distance)[0, :, 0, :]  # [h, T]

  def bias(self, q_pos, k_pos):
    r1, r2 = self.constrained()
    return self.kernel(r1, r2, abs_distance(q_pos, k_pos))
