"""Transformer-XL relative attention (Dai et al. 2019, sec. 3.3): the logit of
query i and key j is the sum of the four terms

  (a) q_i . k_j   (b) q_i . W_R R_{i-j}   (c) u . k_j   (d) v . W_R R_{i-j}
  = (q_i + u) . k_j + (q_i + v) . W_R R_{i-j}

scaled by 1/sqrt(d_head) as a whole (reference: kimiyoung/transformer-xl,
pytorch/mem_transformer.py ``RelPartialLearnableMultiHeadAttn``: AC + BD, then
``attn_score.mul_(self.scale)``). R_t = [sin(t w), cos(t w)] with
w_f = 10000^(-2f/d_rel) (``PositionalEmbedding``, halves concatenated, not
interleaved); W_R = ``r_net``, a bias-free [d_rel, heads * d_head] projection;
u = ``r_w_bias``, v = ``r_r_bias``, [heads, d_head]. Init as the reference's
train.py (init='normal', init_std=0.02) for W_R, u and v.

Scale: lenx's attention module hands ``scores`` q already multiplied by
1/sqrt(d_head), so (q + u) / sqrt(d) = q_scaled + u / sqrt(d): u and v are kept
in the paper's units and divided by sqrt(d_head) here. (With log-n query scaling
on, only q is scaled, not u or v.)

Exact per block without the rel-shift trick or an L x L x d tensor: by
sin((i-j)w) = sin iw cos jw - cos iw sin jw and cos((i-j)w) = cos iw cos jw +
sin iw sin jw, term (b)+(d) = Qf_i . Kf_j with key features Kf_j = [cos jw,
sin jw] and query features Qf_i = [A sin iw + B cos iw, B sin iw - A cos iw],
where [A, B] = (q_i + v) W_R^T splits the sin and cos halves. That works for any
(sorted, gapped, offset) positions with static shapes. Positions are first taken
relative to the block's first query position (exact, since only i - j matters),
which keeps the float32 angles small and makes shifts bitwise invariant.

Deviation: lenx shares one encoding by all layers, so u, v (shared in the
reference too, untie_r=False) and W_R (one per layer in the reference) serve
every layer.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from posenc.base import PositionalEncoding, qk_dot, register


def sinusoid_features(t, dim, base=10000.0):
  """(sin(t w), cos(t w)), each [..., dim/2], w_f = base^(-2f/dim) as the reference."""
  inv_freq = 1.0 / (base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angles = t.astype(jnp.float32)[..., None] * inv_freq
  return jnp.sin(angles), jnp.cos(angles)


def relative_position_logits(qv, w_r, q_pos, k_pos, base=10000.0):
  """(q_i + v) . W_R R_{i-j} for qv [b, sq, h, d], w_r [d_rel, h, d] -> [b, h, sq, sk]."""
  d_rel = w_r.shape[0]
  origin = q_pos[:, :1]  # exact: the result depends only on i - j
  proj = jnp.einsum("bqhd,rhd->bqhr", qv, w_r.astype(qv.dtype), preferred_element_type=jnp.float32)
  a, b = jnp.split(proj, 2, axis=-1)  # coefficients of sin / cos, [b, sq, h, d_rel/2]
  sin_q, cos_q = (x[:, :, None, :] for x in sinusoid_features(q_pos - origin, d_rel, base))
  sin_k, cos_k = sinusoid_features(k_pos - origin, d_rel, base)
  q_feat = jnp.concatenate([a * sin_q + b * cos_q, b * sin_q - a * cos_q], axis=-1)
  k_feat = jnp.concatenate([cos_k, sin_k], axis=-1)  # [b, sk, d_rel]
  return jnp.einsum("bqhr,bkr->bhqk", q_feat, k_feat, preferred_element_type=jnp.float32)


@register("transformer_xl")
class TransformerXL(PositionalEncoding):
  """Content bias u, position bias v, projected sinusoidal R_{i-j} (sec. 3.3)."""

  relative = True

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        d_rel=0,  # width of R (even); 0 = d_model as in the paper
        base=10000.0,  # wavelength base of R
        init_std=0.02,  # normal init std of W_R, u, v (reference init_std)
    ))

  @classmethod
  def finalize_config(cls, own, config):
    if own.d_rel == 0:
      own.d_rel = config.model.d_model
    if own.d_rel < 2 or own.d_rel % 2:
      raise ValueError(
          f"posenc.transformer_xl.d_rel must be a positive even integer, got {own.d_rel}")

  def __init__(self, config, model_config, *, rngs):
    super().__init__(config, model_config, rngs=rngs)
    h, d = model_config.num_heads, model_config.head_dim
    d_rel = config.d_rel or model_config.d_model
    init = jax.nn.initializers.normal(config.init_std)
    self.w_r = nnx.Param(init(rngs.params(), (d_rel, h, d)))
    self.u = nnx.Param(init(rngs.params(), (h, d)))
    self.v = nnx.Param(init(rngs.params(), (h, d)))

  def scores(self, q, k, q_pos, k_pos):
    scale = 1.0 / math.sqrt(self.head_dim)  # q arrives pre-scaled; see module docstring
    content = qk_dot(q + (scale * self.u[...]).astype(q.dtype), k)  # (a) + (c)
    qv = q + (scale * self.v[...]).astype(q.dtype)
    return content + relative_position_logits(qv, self.w_r[...], q_pos, k_pos,
                                              self.config.base)  # (b) + (d)
