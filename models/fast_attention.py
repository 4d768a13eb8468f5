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
cotangent is float32. Here both backward dots take ``dtype`` inputs with float32
accumulation (float32 on CPU, see ``_bdot``), and V / dO are head-major
([b, h, s, d]) so every product is a plain batched matmul. The result equals
autodiff of the plain formulation to float32 rounding (tests/test_fast_paths.py).
"""
import functools

import jax
import jax.numpy as jnp

NEG_INF = -1e30  # same finite constant as attention.NEG_INF


def _bdot(a, b, contract_a, contract_b, dtype):
  """Batched (over the leading [b, h]) matmul with ``dtype`` inputs, float32 accumulation.

  On CPU the inputs stay float32: XLA:CPU runs batched bf16 dots as f32 dots on
  up-cast operands, so rounding P to bf16 would only add two passes over it (~4 %
  of a bf16 train step, measured)."""
  if jax.default_backend() == "cpu":
    dtype = jnp.float32
  dims = (((contract_a,), (contract_b,)), ((0, 1), (0, 1)))
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), dims,
                             preferred_element_type=jnp.float32)


def _probs(logits, q_offset):
  """Causal softmax over the last axis; key index <= query index + q_offset."""
  sq, sk = logits.shape[-2:]
  mask = jnp.arange(sk)[None, :] <= q_offset + jnp.arange(sq)[:, None]
  return jax.nn.softmax(jnp.where(mask, logits, NEG_INF), axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def softmax_pv(logits, v, q_offset, dtype):
  """softmax(causal_mask(logits)) V. logits [b, h, sq, sk] f32, v [b, h, sk, d]
  -> [b, h, sq, d] f32; q_offset = sk - sq for the usual trailing queries; dtype =
  the matmul input dtype (jnp.float32 or jnp.bfloat16)."""
  return _bdot(_probs(logits, q_offset), v, 3, 2, dtype)


def _fwd(logits, v, q_offset, dtype):
  p = _probs(logits, q_offset)
  out = _bdot(p, v, 3, 2, dtype)
  return out, (p, v, out)


def _bwd(q_offset, dtype, res, g):
  del q_offset
  p, v, out = res
  dv = _bdot(p, g, 2, 2, dtype)  # [b, h, sk, d]
  dp = _bdot(g, v, 3, 3, dtype)  # [b, h, sq, sk]
  delta = jnp.sum(g * out, axis=-1, keepdims=True)
  d_logits = p * (dp - delta)  # masked entries have p == 0, so their logits get 0
  return d_logits.astype(p.dtype), dv.astype(v.dtype)


softmax_pv.defvjp(_fwd, _bwd)
