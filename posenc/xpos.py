"""xPos (Sun et al. 2022, "A Length-Extrapolatable Transformer", arXiv 2212.10554,
sec. 3; reference: microsoft/torchscale ``torchscale/component/xpos_relative_position.py``):
rotary embedding whose rotation pair i also decays exponentially with distance,

  q_n -> R_n q_n * zeta^(n / scale_base),   k_m -> R_m k_m * zeta^(-m / scale_base)
  q_n . k_m = sum_i zeta_i^((n - m) / scale_base) (R_n q_n . R_m k_m)_i
  zeta_i = (2i + 0.4 d) / (1.4 d),  i = 0..d/2-1,  scale_base = 512

so causal pairs (n >= m) are damped by a factor <= 1 that shrinks with distance,
fastest in the high-frequency pairs (small zeta). Rotation frequencies are
RoPE's 10000^(-2i/d) (torchscale ``fixed_pos_embedding`` over d/2 entries).

Layout: torchscale rotates every two (interleaved) dimensions; lenx uses
rotate-half like ``posenc.rope`` (pair i = dims i and i + d/2), with zeta_i applied
to both dims of pair i, so the pairs stay consistent. With ``decay=False`` this
is exactly ``rope`` (same rotation, no scaling).

Finite in float32 at any length: zeta^(n/512) alone overflows (zeta_0 = 0.286,
0.286^(-65536/512) ~ 1e70). torchscale centres positions on the sequence
(min_pos = -len // 2); here the decay is applied in ``scores``, per (query
block, key block), with both exponents centred on the middle c of the block's
query positions: q gets zeta^((n - c)/sb), k gets zeta^((c - m)/sb). The
product is exactly zeta^((n - m)/sb). For causal pairs in a block (m <= n),
each exponent is at most half the query span over sb, so blockwise evaluation
(blocks of a few thousand) stays in range at any length, and whole-sequence
attention stays finite up to ~72k tokens (|exponent| <= 70 for zeta_0; at 65536
it is 64, 0.286^-64 ~ 1e35 < 3e38). Far-away keys get factors that underflow to
0, their true (negligible) value. Future (masked) pairs have factor > 1 and can
overflow at distances beyond ~36k, as their exact value does; the causal mask
replaces them, and their gradient is 0, not NaN.
"""
import jax.numpy as jnp
import ml_collections
import numpy as np

from posenc.base import PositionalEncoding, qk_dot, register
from posenc.xla_ops import materialize
from posenc.rope import apply_rope


def xpos_zeta(head_dim):
  """zeta_i = (2i + 0.4 d) / (1.4 d) for i = 0..d/2-1 (torchscale ``scale`` buffer), float32."""
  if head_dim < 2 or head_dim % 2:
    raise ValueError(f"xpos needs an even head_dim >= 2, got {head_dim}")
  i2 = np.arange(0, head_dim, 2, dtype=np.float64)
  return ((i2 + 0.4 * head_dim) / (1.4 * head_dim)).astype(np.float32)


def rope_inv_freq(head_dim, base=10000.0):
  """base^(-2i/d), i = 0..d/2-1 (float32), as ``rope`` without scaling."""
  return (1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)).astype(np.float32)


def decay_factors(positions, center, zeta, scale_base, sign):
  """zeta^(sign * (pos - center) / scale_base) for rotate-half layout: [b, s, 1, d] float32."""
  exponent = sign * (positions.astype(jnp.float32) - center) / scale_base  # [b, s]
  log_zeta = jnp.log(jnp.asarray(zeta, jnp.float32))
  factor = materialize(jnp.exp, exponent[:, :, None] * log_zeta)  # [b, s, d/2], stored
  return jnp.concatenate([factor, factor], axis=-1)[:, :, None, :]


@register("xpos")
class XPos(PositionalEncoding):
  """Rotary embedding with per-pair exponential decay zeta^((n-m)/scale_base)."""

  relative = True

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        base=10000.0,  # rotary theta base
        scale_base=512.0,  # torchscale default; larger = slower decay
        decay=True,  # False = plain RoPE (the ablation in the paper)
    ))

  @classmethod
  def finalize_config(cls, own, config):
    if not own.scale_base > 0:
      raise ValueError(f"posenc.xpos.scale_base must be > 0, got {own.scale_base}")
    xpos_zeta(config.model.head_dim or config.model.d_model // config.model.num_heads)

  def __init__(self, config, model_config, *, rngs):
    super().__init__(config, model_config, rngs=rngs)
    # static constants (tuples), so they are neither trained nor checkpointed
    self.zeta = tuple(xpos_zeta(model_config.head_dim).tolist())
    self.inv_freq = tuple(rope_inv_freq(model_config.head_dim, config.base).tolist())

  def rotate(self, q, k, q_pos, k_pos):
    return apply_rope(q, q_pos, self.inv_freq), apply_rope(k, k_pos, self.inv_freq)

  def scores(self, q, k, q_pos, k_pos):
    if not self.config.decay:
      return qk_dot(q, k)
    # centre of the block's queries: exact (only n - m matters) and keeps exponents small
    lo, hi = jnp.min(q_pos, axis=1, keepdims=True), jnp.max(q_pos, axis=1, keepdims=True)
    center = 0.5 * (lo.astype(jnp.float32) + hi.astype(jnp.float32))
    sb = self.config.scale_base
    q = q * decay_factors(q_pos, center, self.zeta, sb, 1.0).astype(q.dtype)
    k = k * decay_factors(k_pos, center, self.zeta, sb, -1.0).astype(k.dtype)
    return qk_dot(q, k)
