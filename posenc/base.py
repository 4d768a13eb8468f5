"""The interface between the attention module and every positional encoding.

An encoding overrides only the hooks it needs; the defaults add no positional
information. The attention module calls, in this order and never by name:

  x = enc.embed(x, positions)                 # once, on token embeddings [b, s, d]
  q, k = enc.rotate(q, k, q_pos, k_pos)       # per layer, q/k [b, s, h, dh]
  logits = enc.scores(q, k, q_pos, k_pos)     # per (query block, key block)
                                              #   = q.k (+ enc.bias(q_pos, k_pos))

An encoding with a mask of its own may also answer ``enc.tile_attended(q_pos, k_pos)``, so
that blockwise attention skips the tiles it removes entirely. One whose logits rotate keys
per part (piecewise RoPE methods) answers ``key_views`` / ``view_scores``, so that a KV cache
keeps each key's rotations and a decode step rotates only its own tokens.

``bias`` / ``scores`` on a block of (query, key) positions must equal the matching
slice of the full-length result: that is what lets long evaluation run blockwise
without an L x L matrix. An encoding that needs a whole row of keys (CoPE) sets
``blockwise = False`` and long evaluation then takes the full path.
"""
from typing import ClassVar

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from posenc.xla_ops import bmm, heads_last, row_major, to_heads

registry = {}


def register(name):
  """Class decorator: registers an encoding under ``name``."""

  def wrap(cls):
    if name in registry and registry[name] is not cls:
      raise ValueError(f"positional encoding {name!r} registered twice")
    cls.name = name
    registry[name] = cls
    return cls

  return wrap


@jax.custom_vjp
def qk_dot(q, k):
  """Content logits q.k for q [b, sq, h, d], k [b, sk, h, d] -> [b, h, sq, sk] (float32).

  Under differentiation (training) q and k are first copied head-major and the
  backward products dQ = dS K, dK = dS^T Q run with dS in q's dtype and every
  operand a real row-major buffer, so bfloat16 runs as bfloat16 on XLA:CPU (see
  ``posenc.xla_ops``); autodiff of the einsum would run both in float32.
  """
  return jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)


def grouped_qk(q, k):
  """Logits q.k of queries q [b, sq, h, d] over cached keys k [b * kv, t, d] (a KV cache's
  layout: batch and kv heads merged, each head's keys contiguous; ``models.generate``), query
  head j reading kv head j // (h / kv), without copying k -> [b, kv, h // kv, sq, t] float32."""
  b, s, h, d = q.shape
  kv = k.shape[0] // b
  q = q.reshape(b, s, kv, h // kv, d).transpose(0, 2, 3, 1, 4).reshape(b * kv, -1, d)
  logits = jnp.einsum("nqd,ntd->nqt", q, k, preferred_element_type=jnp.float32)
  return logits.reshape(b, kv, h // kv, s, -1)


def _qk_dot_fwd(q, k):
  qh, kh = to_heads(q), to_heads(k)
  return bmm(qh, kh, 3, 3), (heads_last(q), kh)


def _qk_dot_bwd(res, g):
  q_t, kh = res  # Q^T [b, h, d, sq], K [b, h, sk, d]
  gd = g.astype(kh.dtype)
  dq = bmm(gd, kh, 3, 2)  # dS K: [b, h, sq, d]
  dk_t = bmm(q_t, gd, 3, 2)  # (dS^T Q)^T = Q^T dS: [b, h, d, sk], no [sq, sk] transpose
  # cast into buffers of their own (bf16): fused into the consumers instead, the f32 ->
  # bf16 -> f32 round trip makes XLA:CPU's RoPE-backward fusion ~10x slower (measured)
  dq, dk_t = (row_major(t.astype(kh.dtype)) for t in (dq, dk_t))
  return dq.transpose(0, 2, 1, 3), dk_t.transpose(0, 3, 1, 2)


qk_dot.defvjp(_qk_dot_fwd, _qk_dot_bwd)


class PositionalEncoding(nnx.Module):
  """Base class; every hook is the identity ("NoPE")."""

  name: ClassVar[str] = "base"
  blockwise: ClassVar[bool] = True  # scores of a block need only that block's positions
  relative: ClassVar[bool] = False  # logits depend only on key_pos - query_pos
  uses_rope: ClassVar[bool] = False  # RoPE-scaling variants apply to it

  @classmethod
  def default_config(cls):
    """This encoding's own sub-config (``config.posenc.<name>``)."""
    return ml_collections.ConfigDict()

  @classmethod
  def finalize_config(cls, own, config):
    """Validates ``own`` (this encoding's sub-config) against the full config and fills
    derived fields in place; raises ValueError naming the problem. Runs before compiling."""
    del own, config

  def __init__(self, config, model_config, *, rngs):
    del rngs
    self.config = config
    self.num_heads = model_config.num_heads
    self.head_dim = model_config.head_dim
    self.d_model = model_config.d_model

  @property
  def max_position(self):
    """Largest position id this encoding can represent (None = unbounded)."""
    return None

  def check_positions(self, max_position_id):
    """Raises ValueError, before any compute, if positions exceed what it supports."""
    limit = self.max_position
    if limit is not None and max_position_id > limit:
      raise ValueError(
          f"encoding {self.name!r} supports positions 0..{limit} but got position "
          f"{max_position_id}; its table has {limit + 1} rows (raise "
          f"config.posenc.{self.name}.max_len, or pick an encoding without a table)")

  def embed(self, x, positions):
    """Adds absolute position information to embeddings x [b, s, d]."""
    del positions
    return x

  def rotate(self, q, k, q_pos, k_pos):
    """Transforms queries/keys [b, s, h, dh] given their positions [b, s]."""
    del q_pos, k_pos
    return q, k

  def bias(self, q_pos, k_pos):
    """Additive logit bias [b or 1, h, sq, sk] for these positions, or None."""
    del q_pos, k_pos
    return None

  @property
  def content_only(self):
    """Whether ``scores`` is exactly ``qk_dot(q, k)`` (no bias, no rule of its own), so that
    attention may run a fused kernel that forms the logits itself (models/cpu_attention.py).
    Derived from which hooks a subclass overrides; one that overrides ``scores`` but can be
    plain (RoPE without a piecewise extension) says so itself."""
    cls = type(self)
    return cls.scores is PositionalEncoding.scores and cls.bias is PositionalEncoding.bias

  @property
  def same_rule_every_head(self):
    """Whether ``scores`` treats every head alike (no per-head bias, slope or table), so
    that the heads' queries may be stacked as more query rows of one head (a KV cache's
    grouped-query step: ``models.generate``). False unless an encoding says so."""
    return False

  def distance_bias(self, max_distance=None):
    """(slopes [h] or None, table [h, T] or None) when ``bias`` is exactly
    -slopes_h |i - j| + table_h[clamp(i - j, 0, T - 1)] for query position i and key position
    j, whatever the positions; None (the default) otherwise. Such a bias is formed inside the
    fused CPU attention kernel from the positions (models/cpu_attention.py), with gradients for
    slopes and table, instead of as a [b, h, sq, sk] array.

    max_distance: a static bound on i - j that the caller guarantees. A bias that is a
    function of i - j with no finite exact table (KERPLE, Sandwich) returns its table over
    0..max_distance when given one, None without; one exact for any distance ignores it."""
    del max_distance
    return None

  def kernel_bias(self, max_distance=None):
    """``distance_bias(max_distance)`` where the logits are exactly q.k plus that bias
    (``scores`` is this base class's), else None: what a fused kernel may compute in place of
    ``scores`` (a subclass that changes ``scores`` keeps the XLA path even if it inherits a
    bias)."""
    plain = type(self).scores is PositionalEncoding.scores
    return self.distance_bias(max_distance) if plain else None

  @property
  def has_kernel_pieces(self):
    """Whether ``kernel_pieces`` gives this encoding's logits (then the fused CPU kernel
    evaluates them: models/cpu_attention.py, ``piecewise_attention``)."""
    return False

  def kernel_pieces(self, q, k, q_pos, k_pos):
    """For logits that are the q.k of queries and keys rotated per part, the part of each
    pair chosen from its positions (piecewise RoPE methods, ``extensions.piecewise``):
    (queries [P_q, b, s, h, d], keys [P_k, b, s, h, d], pieces) as
    ``cpu_attention.piecewise_attention`` takes them; None where ``has_kernel_pieces`` is
    False."""
    del q, k, q_pos, k_pos
    return None

  def key_views(self, k, k_pos):
    """For logits that are the q.k of keys rotated per part (piecewise RoPE methods): the keys
    [b, s, kv, d] at positions k_pos [b, s] under each distinct key rotation, a tuple. A key's
    views depend on its own position alone, so a KV cache keeps them and a decode step rotates
    only its own tokens (``models.generate``). None (the default): the cache keeps the keys
    ``rotate`` gives."""
    del k, k_pos
    return None

  def view_scores(self, q, views, q_pos, k_pos):
    """Logits [b, kv, h // kv, sq, t] (float32) of queries q [b, sq, h, d] (scaled, not
    rotated) over cached key views (``key_views``, each [b * kv, t, d] in the cache's layout:
    ``grouped_qk``) at positions k_pos [b, t]; for encodings whose ``key_views`` is not None."""
    raise NotImplementedError(f"{self.name!r} keeps no key views")

  def tile_attended(self, q_pos, k_pos):
    """For an encoding whose logits mask pairs beyond the causal mask: whether any pair of a
    (query block, key block) tile at positions q_pos [b, bq], k_pos [b, bk] may be attended
    (a traced bool), so that blockwise attention skips the tiles it removes entirely (a
    Lambda mask then costs O(L x window), not O(L^2)). None (the default): every causal
    tile is attended, nothing to check."""
    del q_pos, k_pos
    return None

  def scores(self, q, k, q_pos, k_pos):
    """Attention logits [b, h, sq, sk] of one (query block, key block); float32."""
    logits = qk_dot(q, k)
    b = self.bias(q_pos, k_pos)
    return logits if b is None else logits + b
