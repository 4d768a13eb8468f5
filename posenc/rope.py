"""Rotary position embedding (Su et al. 2021, RoFormer, eq. 34): rotate each pair
of query/key dimensions by angle pos * theta_i, so q_m . k_n depends only on m - n.

Layout is rotate-half (GPT-NeoX / Hugging Face ``rotate_half``): dimension i is
paired with i + rotary_dim/2, not with its neighbour. Angles are computed in
float32 from integer positions on the fly (no position tables), so any position
works. Frequencies and context-extension scaling come from
``posenc.rope_scaling.rope_frequencies``, which takes Hugging Face
``rope_scaling`` dicts (``config.posenc.rope.scaling``), then
``adjust_frequencies`` (Resonance rounding, p-RoPE). Context-extension methods that
change which positions a (query, key) pair is rotated at (ReRoPE, Self-Extend, ...) set
``scores_rule`` and are evaluated per block by ``extensions.piecewise.scores``.
"""
import json

import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from posenc.base import PositionalEncoding, qk_dot, register
from posenc.xla_ops import materialize
from posenc.rope_scaling import adjust_frequencies, rope_frequencies

__all__ = ["apply_rope", "rope_frequencies", "RoPE", "scaling_dict"]


def rotate_half(x):
  """[x1, x2] -> [-x2, x1] on the last axis (HF ``rotate_half``)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x, positions, inv_freq, attention_factor=1.0):
  """Rotates x [b, s, h, d] at positions [b, s] with inv_freq [r/2] (r <= d rotary dims).

  Dimensions past r = 2 * len(inv_freq) pass through unchanged (partial rotary).
  ``attention_factor`` multiplies cos and sin (YaRN / LongRoPE temperature).
  """
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  rot = 2 * inv_freq.shape[-1]
  angles = positions.astype(jnp.float32)[:, :, None] * inv_freq
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [b, s, 1, r]
  cos, sin = materialize(
      lambda a: (jnp.cos(a) * attention_factor, jnp.sin(a) * attention_factor), angles)
  x_rot, x_pass = x[..., :rot].astype(jnp.float32), x[..., rot:]
  out = x_rot * cos + rotate_half(x_rot) * sin
  return jnp.concatenate([out.astype(x.dtype), x_pass], axis=-1)


def scaling_fields():
  """Every Hugging Face rope_scaling key, unset; set only what a model card gives."""
  p = config_dict.placeholder
  return ml_collections.ConfigDict(dict(
      rope_type="default",  # default|linear|ntk|dynamic|yarn|llama3|longrope
      factor=p(float), original_max_position_embeddings=p(int),
      beta_fast=p(float), beta_slow=p(float), mscale=p(float), mscale_all_dim=p(float),
      attention_factor=p(float), truncate=p(bool), low_freq_factor=p(float),
      high_freq_factor=p(float), short_factor=p(tuple), long_factor=p(tuple),
  ))


def scaling_dict(cfg):
  """The HF-style dict of a rope config: ``scaling_json`` if given, else the set fields."""
  if cfg.get("scaling_json"):
    try:
      d = json.loads(cfg.scaling_json)
    except json.JSONDecodeError as e:
      raise ValueError(f"posenc.rope.scaling_json is not valid JSON: {e}") from e
  else:
    d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.scaling.items()
         if v is not None}
  if cfg.partial_rotary_factor != 1.0:
    d["partial_rotary_factor"] = cfg.partial_rotary_factor
  return d


@register("rope")
class RoPE(PositionalEncoding):
  """Rotary embedding of q and k; relative by construction."""

  relative = True
  uses_rope = True

  @classmethod
  def default_config(cls):
    return ml_collections.ConfigDict(dict(
        base=10000.0,  # theta base of eq. 15 (Llama 3 uses 500000)
        partial_rotary_factor=1.0,  # rotate only this fraction of head_dim (GPT-J/NeoX: 0.25)
        scaling=scaling_fields(),  # Hugging Face rope_scaling keys (context extension)
        scaling_json="",  # or paste a model card's rope_scaling dict as JSON (overrides scaling)
        original_len=0,  # length the model was trained at; 0 = config.train_len
        eval_len=0,  # sequence length for dynamic/longrope frequencies; 0 = original_len
        resonance=False,  # Resonance RoPE: round every wavelength to an integer (after scaling)
        p_fraction=1.0,  # p-RoPE: only this highest fraction of the frequencies rotates
        scores_rule="",  # JSON {"name": ..., params} of a piecewise method (extensions/), or ""
    ))

  @classmethod
  def finalize_config(cls, own, config):
    if own.original_len == 0:
      own.original_len = config.train_len
    rope_frequencies(config.model.head_dim or config.model.d_model // config.model.num_heads,
                     own.base, scaling_dict(own), own.eval_len or own.original_len,
                     own.original_len)  # raises ValueError on an invalid scaling dict
    adjust_frequencies([1.0], own.resonance, own.p_fraction)  # raises on a bad p_fraction

  def __init__(self, config, model_config, *, rngs):
    super().__init__(config, model_config, rngs=rngs)
    inv_freq, self.attention_factor = self.frequencies(config.eval_len or config.original_len
                                                       or None)
    self.inv_freq = tuple(inv_freq.tolist())  # static constants, not trainable state
    self.scores_rule = config.get("scores_rule", "")

  @property
  def length_dependent(self):
    """Whether the frequencies depend on the sequence length (dynamic NTK, LongRoPE): an
    incremental decode must then re-rotate cached keys as it grows (``models.generate``)."""
    return scaling_dict(self.config).get("rope_type") in ("dynamic", "longrope")

  def frequencies(self, seq_len):
    """(inv_freq float32 [r/2], attention_factor) for a sequence of ``seq_len`` tokens."""
    c = self.config
    inv_freq, attention_factor = rope_frequencies(self.head_dim, c.base, scaling_dict(c),
                                                  seq_len, c.original_len or None)
    inv_freq = adjust_frequencies(inv_freq, c.get("resonance", False), c.get("p_fraction", 1.0))
    return inv_freq, attention_factor

  def _rotate(self, x, positions):
    return apply_rope(x, positions, self.inv_freq, self.attention_factor)

  def rotate(self, q, k, q_pos, k_pos):
    if self.scores_rule:  # piecewise methods rotate per block and part, in scores
      return q, k
    return self._rotate(q, q_pos), self._rotate(k, k_pos)

  @property
  def content_only(self):
    return not self.scores_rule

  @property
  def same_rule_every_head(self):
    return True  # the rotation and any piecewise rule depend on positions only

  def scores(self, q, k, q_pos, k_pos):
    if not self.scores_rule:
      return qk_dot(q, k)
    return _piecewise().scores(self.scores_rule, q, k, q_pos, k_pos, self._rotate)

  @property
  def has_kernel_pieces(self):
    return bool(self.scores_rule) and _piecewise().has_kernel_form(self.scores_rule)

  def kernel_pieces(self, q, k, q_pos, k_pos):
    if not self.scores_rule:
      return None
    return _piecewise().kernel_pieces(self.scores_rule, q, k, q_pos, k_pos, self._rotate)

  def key_views(self, k, k_pos):
    if not self.scores_rule:
      return None
    return _piecewise().key_views(self.scores_rule, k, k_pos, self._rotate)

  def view_scores(self, q, views, q_pos, k_pos):
    return _piecewise().view_scores(self.scores_rule, q, views, q_pos, k_pos, self._rotate)

  def tile_attended(self, q_pos, k_pos):
    if not self.scores_rule:
      return None
    return _piecewise().tile_attended(self.scores_rule, q_pos, k_pos)


def _piecewise():
  from extensions import piecewise  # pylint: disable=g-import-not-at-top (extensions imports posenc)
  return piecewise

