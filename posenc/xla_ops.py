"""Small compute helpers shared by the encodings and the attention module.

They exist because of how XLA:CPU compiles (measured, benchmarks/README.md):

* ``materialize(fn, x)``: fn(x) computed once into a buffer of its own. XLA fuses
  elementwise producers into their consumers, so a table of transcendentals
  broadcast over heads (RoPE's cos/sin [b, s, 1, r] times q/k [b, s, h, d]) is
  recomputed for every element of every consumer, forward and backward (~15 % of
  a RoPE train step). A ``lax.cond`` output is always a buffer of its own
  (``optimization_barrier`` would be the idiom, but XLA:CPU strips it before
  fusion), and CSE merges identical ones (the RoPE tables of all layers become
  one). Both branches are ``fn``, so the predicate (true unless x's first element
  is NaN) never changes the result.
* ``row_major`` / ``to_heads`` / ``heads_last``: a transposed operand is a strided *view* for XLA,
  and XLA:CPU runs a bfloat16 matmul on a view as a float32 one on up-cast copies
  (~3x slower); these copy the transpose into a row-major buffer (bfloat16 only).
* ``bmm``: a matmul batched over the two leading axes with float32 accumulation.
"""
import jax
import jax.numpy as jnp


def materialize(fn, x):
  """fn(x), computed once into a buffer of its own (see the module docstring).

  CPU only: elsewhere it is plain fn(x), since a GPU/TPU ``cond`` can cost a host
  round trip for its predicate, and the problems worked around here were measured
  on XLA:CPU only."""
  if jax.default_backend() != "cpu":
    return fn(x)
  first = x.ravel()[0]
  return jax.lax.cond(first == first, fn, fn, x)


def bmm(a, b, contract_a, contract_b, dtype=None):
  """sum over a[..., contract_a] b[..., contract_b], batched over axes (0, 1); inputs
  cast to ``dtype`` (default: a's), float32 result."""
  dtype = dtype or a.dtype
  dims = (((contract_a,), (contract_b,)), ((0, 1), (0, 1)))
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), dims,
                             preferred_element_type=jnp.float32)


def row_major(x):
  """x (typically a transposed view) copied into a row-major buffer: the transpose
  happens *outside* the cond, whose output XLA lays out row-major, so the copy inside
  is a physical transpose. (``y * 1`` keeps JAX from forwarding the input through the
  cond; XLA drops the multiply. A transpose *inside* the branch would instead become
  a free relabelling of the layout, and the matmul would again see a strided view.)"""
  if x.dtype == jnp.float32:  # float32 matmuls read views at full speed; a copy only costs
    return x  # (measured: bfloat16 train step -13 % with the copies, float32 +7 %)
  return materialize(lambda y: y * jnp.ones((), y.dtype), x)


def to_heads(x, dtype=None):
  """[b, s, h, d] -> [b, h, s, d], a real head-major buffer unless float32 (``dtype``: cast)."""
  return row_major(x.transpose(0, 2, 1, 3).astype(dtype or x.dtype))


def heads_last(x, dtype=None):
  """[b, s, h, d] -> [b, h, d, s] (X^T per head), a real buffer unless float32 (``dtype``: cast)."""
  return row_major(x.transpose(0, 2, 3, 1).astype(dtype or x.dtype))
