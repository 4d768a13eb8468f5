"""The interface between the attention module and every positional encoding.

An encoding overrides only the hooks it needs; the defaults add no positional
information. The attention module calls, in this order and never by name:

  x = enc.embed(x, positions)                 # once, on token embeddings [b, s, d]
  q, k = enc.rotate(q, k, q_pos, k_pos)       # per layer, q/k [b, s, h, dh]
  logits = enc.scores(q, k, q_pos, k_pos)     # per (query block, key block)
                                              #   = q.k (+ enc.bias(q_pos, k_pos))

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


def qk_dot(q, k):
  """Content logits q.k for q [b, sq, h, d], k [b, sk, h, d] -> [b, h, sq, sk] (float32)."""
  return jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)


def position_table(fn, x):
  """fn(x), computed once and stored, for small position-derived tables (cos/sin, decays).

  Why: XLA:CPU fuses elementwise producers into their consumers, so a table of
  transcendentals broadcast over heads (RoPE's cos/sin [b, s, 1, r] times q/k
  [b, s, h, d]) gets recomputed for every element of every consumer, forward and
  backward: ~15 % of a RoPE train step (measured, benchmarks/README.md). A
  ``lax.cond`` output is always materialised and CSE merges the tables of all
  layers into one; both branches are ``fn``, so the predicate (true unless x[0]
  is NaN) never changes the result. (``optimization_barrier`` would be the idiom,
  but XLA:CPU strips it before fusion.)
  """
  first = x.ravel()[0]
  return jax.lax.cond(first == first, fn, fn, x)


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

  def scores(self, q, k, q_pos, k_pos):
    """Attention logits [b, h, sq, sk] of one (query block, key block); float32."""
    logits = qk_dot(q, k)
    b = self.bias(q_pos, k_pos)
    return logits if b is None else logits + b
