"""FIRE, Functional Interpolation for Relative Positions (Li et al. 2023, arXiv
2310.04418, sec. 3): a learned additive bias

    b(i, j) = f_theta( psi(i - j) / psi(max(L, i)) ),   psi(x) = log(c x + 1),

for query position i >= key position j. f_theta is an MLP 1 -> 32 (ReLU) -> num_heads
(one value per head). Follows the PyTorch listing of the paper's appendix (class
``FIRE``, reproduced in many reimplementations):
  * c: learnable scalar, init 0.1; positivity via the absolute value, psi uses |c x|;
  * L: "learnable threshold" L = |L_multiplier * init_L|, init_L = 512 fixed and
    L_multiplier learnable, init 1.0;
  * the normaliser is psi(max(L, i)) + eps, eps = 1e-6 (not min: the normaliser grows
    with the query position only past the threshold);
  * MLP weights/biases init like torch.nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
Distances use |i - j| like the listing (the causal mask removes j > i anyway).

Not relative in general: the normaliser depends on the query position i, so the
logits are invariant to shifting all positions only while every query position stays
below the threshold L (then psi(max(L, i)) = psi(L) is constant); ``relative = False``.
The bias is an elementwise function of (i, j), so a block of (query, key) positions
equals the matching slice of the full bias. One instance is shared by all layers.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from posenc.base import PositionalEncoding, register

__all__ = ["FIRE", "fire_features", "psi"]


def psi(x, c):
  """psi(x) = log(|c x| + 1) (the paper's log transform, c kept positive by abs)."""
  return jnp.log1p(jnp.abs(c * x))


def fire_features(q_pos, k_pos, c, L, eps=1e-6):
  """psi(|i - j|) / (psi(max(L, i)) + eps) as float32 [b, sq, sk].

  q_pos [b, sq] and k_pos [b, sk] are integer positions; c and L scalars (L already
  thresholded, i.e. |L_multiplier * init_L|).
  """
  i = q_pos.astype(jnp.float32)[:, :, None]
  j = k_pos.astype(jnp.float32)[:, None, :]
  normaliser = psi(jnp.maximum(i, L), c) + eps
  return psi(i - j, c) / normaliser


def _torch_linear_init(key, shape, fan_in):
  bound = 1.0 / math.sqrt(fan_in)
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


@register("fire")
class FIRE(PositionalEncoding):
  """MLP of the normalised log distance; 3 * width + width * heads + heads + 2 params."""

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        mlp_width=32,  # hidden units of f_theta (paper: 32)
        init_c=0.1,  # initial c of psi(x) = log(c x + 1) (paper: 0.1)
        init_L=512.0,  # threshold L = |L_multiplier * init_L|, multiplier starts at 1
        eps=1e-6,  # added to the normaliser (paper's listing)
    ))

  @classmethod
  def finalize_config(cls, own, config):
    del config
    if own.mlp_width < 1:
      raise ValueError(f"posenc.fire.mlp_width must be >= 1, got {own.mlp_width}")
    if not own.init_L > 0:
      raise ValueError(f"posenc.fire.init_L must be > 0, got {own.init_L}")
    if own.init_c == 0:
      raise ValueError("posenc.fire.init_c must be non-zero (psi would be 0 everywhere)")

  def __init__(self, config, model_config, *, rngs):
    super().__init__(config, model_config, rngs=rngs)
    w, h = config.mlp_width, model_config.num_heads
    self.w1 = nnx.Param(_torch_linear_init(rngs.params(), (w,), 1))
    self.b1 = nnx.Param(_torch_linear_init(rngs.params(), (w,), 1))
    self.w2 = nnx.Param(_torch_linear_init(rngs.params(), (w, h), w))
    self.b2 = nnx.Param(_torch_linear_init(rngs.params(), (h,), w))
    self.c = nnx.Param(jnp.asarray(config.init_c, jnp.float32))
    self.L_multiplier = nnx.Param(jnp.asarray(1.0, jnp.float32))

  def threshold(self):
    """The learned threshold L = |L_multiplier * init_L| (a scalar)."""
    return jnp.abs(self.L_multiplier[...] * self.config.init_L)

  def mlp(self, x):
    """f_theta: [...] -> [..., heads]."""
    hidden = jax.nn.relu(x[..., None] * self.w1[...] + self.b1[...])
    return hidden @ self.w2[...] + self.b2[...]

  def bias(self, q_pos, k_pos):
    x = fire_features(q_pos, k_pos, self.c[...], self.threshold(), self.config.eps)
    return jnp.transpose(self.mlp(x), (0, 3, 1, 2))  # [b, sq, sk, h] -> [b, h, sq, sk]
