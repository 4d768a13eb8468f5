"""The hand-written fast paths equal autodiff of the plain formulations.

softmax_pv (custom VJP after the logits), the model's attention with encodings that
have trainable bias parameters (t5_bias) or rotate q/k (rope), the fused RMSNorm,
and the bfloat16 matmul whose backward runs in bfloat16.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.common import resolve
from models import build_model
from models.fast_attention import causal_softmax, softmax_pv
from models.layers import RMSNorm, mixed_dot, swiglu
from training.steps import split_model


def _normal(seed, shape):
  """Standard normal float32 test data from numpy: eager jax.random compiles a generator
  for every new shape (seconds each on XLA:CPU)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _value_and_vjp(fn, args, g):
  """(fn(*args), its VJP of g) in one compiled call: eagerly, autodiff of these small
  graphs compiles and runs every op on its own (~5x the time)."""
  def run(args, g):
    out, vjp = jax.vjp(fn, *args)
    return out, vjp(g)
  return jax.jit(run)(args, g)


def _plain_softmax_pv(logits, v, offset):
  return jnp.einsum("bhqk,bkhd->bqhd", causal_softmax(logits, offset), v)


@pytest.mark.parametrize("sq,sk", [(16, 16), (5, 12), (1, 7)])
def test_softmax_pv_value_and_grads_equal_autodiff(sq, sk):
  logits = 3.0 * _normal(0, (2, 3, sq, sk))
  v, g = _normal(1, (2, sk, 3, 8)), _normal(2, (2, sq, 3, 8))
  fast, fast_grads = _value_and_vjp(lambda l, x: softmax_pv(l, x, sk - sq, jnp.float32),
                                    (logits, v), g)
  plain, plain_grads = _value_and_vjp(lambda l, x: _plain_softmax_pv(l, x, sk - sq), (logits, v), g)
  assert _rel(fast, plain) < 1e-5
  for a, b in zip(fast_grads, plain_grads):
    assert _rel(a, b) < 1e-5
  # causality: the logit of a future key gets exactly zero gradient
  d_logits = fast_grads[0]
  future = np.arange(sk)[None, :] > (sk - sq) + np.arange(sq)[:, None]
  assert np.all(np.asarray(d_logits)[..., future] == 0.0)


@pytest.mark.parametrize("sq,sk", [(16, 16), (5, 12)])
def test_qk_dot_value_and_grads_equal_autodiff(sq, sk):
  from posenc.base import qk_dot
  q, k = _normal(3, (2, sq, 3, 8)), _normal(4, (2, sk, 3, 8))
  g = _normal(5, (2, 3, sq, sk))
  plain = lambda a, b: jnp.einsum("bqhd,bkhd->bhqk", a, b)
  fast, fast_grads = _value_and_vjp(qk_dot, (q, k), g)
  ref, ref_grads = _value_and_vjp(plain, (q, k), g)
  assert _rel(fast, ref) < 1e-6
  for a, b in zip(fast_grads, ref_grads):
    assert _rel(a, b) < 1e-5
  # bfloat16 inputs: the backward products take dS rounded to bfloat16 (f32 accumulation)
  _, (dq, dk) = _value_and_vjp(qk_dot, (q.astype(jnp.bfloat16), k.astype(jnp.bfloat16)), g)
  assert dq.dtype == dk.dtype == jnp.bfloat16
  assert _rel(dq, ref_grads[0]) < 2e-2 and _rel(dk, ref_grads[1]) < 2e-2


def _model_loss(posenc, with_stats, dtype="float32"):
  """(loss(params), params) of a 2-layer tiny model on fixed tokens."""
  from tests.conftest import make_tiny_config
  c = resolve(make_tiny_config(posenc=posenc, train_len=24, **{"model.num_layers": 2,
                                                                "model.dtype": dtype}))
  graphdef, params = split_model(build_model(c))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, c.model.vocab_size, (2, 24)))
  positions = jnp.broadcast_to(jnp.arange(24), (2, 24))

  def loss(p):
    model = nnx.merge(graphdef, p)
    h, _ = model.features(tokens, positions, with_stats=with_stats)  # stats: plain path
    return jnp.mean(model.logits(h) ** 2)
  return loss, params


def _model_grads(posenc, with_stats):
  loss, params = _model_loss(posenc, with_stats)
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("posenc", ["rope", "t5_bias"])
def test_model_gradients_equal_plain_attention(monkeypatch, posenc):
  monkeypatch.setenv("LENX_CPU_ATTENTION", "xla")  # XLA's paths (the kernel: test_cpu_attention)
  loss_fast, g_fast = _model_grads(posenc, False)
  loss_plain, g_plain = _model_grads(posenc, True)
  assert _rel(loss_fast, loss_plain) < 1e-6
  flat_fast, flat_plain = dict(nnx.traversals.flatten_mapping(g_fast)), dict(
      nnx.traversals.flatten_mapping(g_plain))
  assert flat_fast.keys() == flat_plain.keys()
  for key in flat_fast:
    assert _rel(flat_fast[key], flat_plain[key]) < 1e-5, key
  if posenc == "t5_bias":  # the encoding's trainable table still gets its gradient
    enc = [v for k, v in flat_fast.items() if k[0] == "posenc"]
    assert enc and all(float(jnp.max(jnp.abs(v))) > 0 for v in enc)


def test_rmsnorm_matches_flax_and_autodiff():
  x = _normal(2, (3, 5, 16)) * 2.0 + 0.5
  g = _normal(3, (3, 5, 16))
  ours, ref = RMSNorm(16, rngs=nnx.Rngs(0)), nnx.RMSNorm(16, epsilon=1e-6, rngs=nnx.Rngs(0))
  scale = _normal(4, (16,))
  ours.scale[...] = scale
  ref.scale[...] = scale

  def vjp(m):
    gd, st = nnx.split(m)
    out, f = jax.vjp(lambda s, x: nnx.merge(gd, s)(x), st, x)
    ds, dx = f(g)
    return out, ds["scale"][...], dx
  for a, b in zip(vjp(ours), vjp(ref)):
    assert _rel(a, b) < 1e-5


def test_swiglu_grad_equals_autodiff_of_plain_formula():
  h = 3.0 * _normal(7, (2, 5, 24))
  g = _normal(8, (2, 5, 12))

  def plain(h):
    gate, up = jnp.split(h, 2, axis=-1)
    return jax.nn.silu(gate) * up
  out, (dh,) = _value_and_vjp(swiglu, (h,), g)
  ref, (dh_ref,) = _value_and_vjp(plain, (h,), g)
  assert _rel(out, ref) < 1e-6 and _rel(dh, dh_ref) < 1e-5


def _eqns(jaxpr):
  """All equations of a jaxpr, including those inside custom_vjp / pjit sub-jaxprs."""
  yield from jaxpr.eqns
  for sub in jax.extend.core.subjaxprs(jaxpr):
    yield from _eqns(sub)


def test_mixed_dot_float32_is_plain_dot_and_bf16_backward_runs_in_bf16():
  x = _normal(5, (4, 6, 32))
  w = _normal(6, (32, 8))
  np.testing.assert_array_equal(mixed_dot(x, w, jnp.float32), jnp.dot(x, w))
  loss = lambda dt: (lambda x, w: jnp.sum(jnp.sin(mixed_dot(x, w, dt))))
  g16, g32 = jax.grad(loss(jnp.bfloat16), (0, 1))(x, w), jax.grad(loss(jnp.float32), (0, 1))(x, w)
  for a, b in zip(g16, g32):
    assert a.dtype == jnp.float32 and _rel(a, b) < 3e-2  # bf16 rounding, not a wrong formula
  jaxpr = jax.make_jaxpr(jax.grad(loss(jnp.bfloat16), (0, 1)))(x, w)
  dots = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
  assert len(dots) >= 3  # forward, dx, dW
  assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)


def test_materialize_equals_fn_and_is_computed_once_per_step():
  from posenc.xla_ops import materialize
  x = jnp.linspace(-3.0, 40.0, 24).reshape(2, 3, 4)
  fn = lambda a: (jnp.cos(a), jnp.sin(a))
  for arr in (x, x.at[0, 0, 0].set(jnp.nan)):  # the NaN predicate takes the other branch
    got, want = materialize(fn, arr), fn(arr)
    for a, b in zip(got, want):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert np.allclose(jax.vmap(lambda r: materialize(jnp.exp, r))(x), jnp.exp(x))
  # a 2-layer RoPE model: the tables of both layers, q and k, forward and backward, are
  # one stored computation (one conditional: a sine in each of its two branches), not
  # recomputed inside every consumer
  loss, params = _model_loss("rope", False)
  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  assert hlo.count(" sine(") == 2 and hlo.count(" cosine(") == 2


@pytest.mark.parametrize("attention", ["xla", "kernel"])
def test_bf16_training_matmuls_all_run_in_bf16(monkeypatch, attention):
  """Every matmul of a bf16 model's forward + backward keeps bf16 operands in the
  compiled program: XLA:CPU up-casts a bf16 dot whose operand is a transposed view to
  f32 (posenc.xla_ops), so this fails if an operand stops being a row-major buffer. With
  the CPU attention kernel (bf16 forward) the attention products leave XLA's dots."""
  import re
  monkeypatch.setenv("LENX_CPU_ATTENTION", attention)
  loss, params = _model_loss("rope", False, "bfloat16")
  hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
  types = dict(re.findall(r"%([\w.\-]+) = (\w+)\[", hlo))
  types.update(re.findall(r"([\w.\-]+): (\w+)\[", hlo))  # fused-computation parameters
  dots = re.findall(r" dot\(%([\w.\-]+), %([\w.\-]+)\)", hlo)
  big = [d for d in dots if "batch_dims" in hlo.split(f"dot(%{d[0]}, %{d[1]})")[1].split("\n")[0]]
  assert len(big) >= 2 * 6  # per layer: q.k, P V forward; dP, dV, dQ, dK backward
  assert "lenx_causal_attention" not in hlo  # training keeps XLA's bf16 attention (forward_only)
  forward = jax.jit(loss).lower(params).compile().as_text()  # no gradient: the bf16 kernel
  assert forward.count("lenx_causal_attention_forward_bf16") == (2 if attention == "kernel" else 0)
  operand_types = {types[name] for pair in dots for name in pair}
  assert operand_types == {"bf16"}, [(a, b, types[a], types[b]) for a, b in dots
                                     if {types[a], types[b]} != {"bf16"}]
