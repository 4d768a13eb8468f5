"""Masked softmax followed by P V, with a hand-written backward pass.

``full_attend`` gets its logits from the encoding's ``scores`` hook (autodiff
flows through the hook, so trainable biases keep their gradients) and hands only
the part after the logits to ``softmax_pv``. Its VJP is the standard attention
backward (FlashAttention, Dao et al. 2022, app. B.2 and Alg. 4, without the
recomputation: P is saved):

  dV = P^T dO,   dP = dO V^T,   D_i = sum_d dO_id O_id (= sum_j P_ij dP_ij),
  dS = P * (dP - D)

Why: autodiff of softmax + einsum emits several extra passes over the
[b, h, sq, sk] tile (the division's two cotangents, the max's gradient, masks)
and, in bfloat16 mode, runs the backward P V dots in float32 because the
cotangent is float32. Here every product takes ``dtype`` inputs with float32
accumulation, and V, dO and dO^T are copied into real head-major buffers first
(``posenc.xla_ops``: XLA:CPU runs a bfloat16 matmul on a transposed view in float32);
dV is computed transposed, dO^T P, so the [sq, sk] matrix P is never transposed.
The result equals autodiff of the plain formulation to float32 rounding
(tests/test_fast_paths.py). ``causal_softmax`` is also the plain path's softmax.
"""
import functools

import jax
import jax.numpy as jnp

from posenc.xla_ops import bmm, heads_last, row_major, to_heads

NEG_INF = -1e30  # finite: a fully masked row gives uniform weights, not NaN


def causal_softmax(logits, q_offset):
  """Causal softmax over the last axis; key index <= query index + q_offset."""
  sq, sk = logits.shape[-2:]
  mask = jnp.arange(sk)[None, :] <= q_offset + jnp.arange(sq)[:, None]
  return jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def softmax_pv(logits, v, q_offset, dtype):
  """causal_softmax(logits) V. logits [b, h, sq, sk] f32, v [b, sk, h, d]
  -> [b, sq, h, d] f32; q_offset = sk - sq for the usual trailing queries; dtype =
  the matmul input dtype (jnp.float32 or jnp.bfloat16)."""
  return _fwd(logits, v, q_offset, dtype)[0]


def _fwd(logits, v, q_offset, dtype):
  p = causal_softmax(logits, q_offset)
  vh = to_heads(v, dtype)
  out = bmm(p, vh, 3, 2, dtype).transpose(0, 2, 1, 3)
  return out, (p, vh, out)


def _bwd(q_offset, dtype, res, g):
  del q_offset
  p, vh, out = res
  gh = to_heads(g, dtype)  # dO, head-major [b, h, sq, d]
  dv_t = bmm(heads_last(g, dtype), p, 3, 2, dtype)  # (P^T dO)^T = dO^T P: [b, h, d, sk]
  dp = bmm(gh, vh, 3, 3)  # dO V^T: [b, h, sq, sk]
  delta = jnp.sum(g * out, axis=-1).transpose(0, 2, 1)[..., None]  # [b, h, sq, 1]
  d_logits = p * (dp - delta)  # masked entries have p == 0, so their logits get 0
  return d_logits.astype(p.dtype), row_major(dv_t.astype(vh.dtype)).transpose(0, 3, 1, 2)


softmax_pv.defvjp(_fwd, _bwd)
