"""Defining properties of shaw, transformer_xl, xpos and sandwich (issue 3, part A),
checked against direct float64 numpy formulas and small hand-computed numbers."""
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import posenc
from posenc.sandwich import sandwich_head_scales
from posenc.xpos import xpos_zeta

ZOO = ("shaw", "transformer_xl", "xpos", "sandwich")


def make(name, num_heads=2, head_dim=8, d_model=16, **own):
  """The encoding ``name`` with its default sub-config updated by ``own``."""
  cls = posenc.get(name)
  cfg = cls.default_config()
  cfg.update(own)
  model = ml_collections.ConfigDict(dict(num_heads=num_heads, head_dim=head_dim, d_model=d_model))
  return cls(cfg, model, rngs=nnx.Rngs(0))


def qk(b, s, h, d, seed=0):
  kq, kk = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kq, (b, s, h, d)), jax.random.normal(kk, (b, s, h, d))


def logits(enc, q, k, q_pos, k_pos):
  def f(q, k, q_pos, k_pos):
    qr, kr = enc.rotate(q, k, q_pos, k_pos)
    return enc.scores(qr, kr, q_pos, k_pos)
  return np.asarray(jax.jit(f)(q, k, q_pos, k_pos))


def scores(enc, q, k, q_pos, k_pos):
  """enc.scores under jit (eager dispatch of many small ops is slow on a busy CPU)."""
  return np.asarray(jax.jit(enc.scores)(q, k, q_pos, k_pos))


# ---------------------------------------------------------------- all four
@pytest.mark.parametrize("name", ZOO)
def test_registered_and_relative(name):
  assert name in posenc.names() and posenc.get(name).relative


@pytest.mark.parametrize("name", ZOO)
def test_shift_invariance_with_gapped_positions(name):
  enc = make(name)
  q, k = qk(2, 10, 2, 8, seed=1)
  pos = jnp.asarray([[0, 1, 3, 4, 9, 10, 11, 20, 21, 40]] * 2)
  base = logits(enc, q, k, pos, pos)
  np.testing.assert_allclose(logits(enc, q, k, pos + 777, pos + 777), base, rtol=1e-4, atol=1e-4)
  # and the positions do matter (a gap changes the logits)
  assert not np.allclose(logits(enc, q, k, pos.at[:, 5:].add(3), pos.at[:, 5:].add(3)), base,
                         atol=1e-4)


# ---------------------------------------------------------------- shaw
def test_shaw_matches_eq4_and_clips_at_k():
  enc = make("shaw", max_distance=3)
  table = np.asarray(enc.rel_key[...])
  assert table.shape == (7, 8)
  q, k = qk(1, 9, 2, 8, seed=2)
  pos = jnp.arange(9)[None]
  got = np.asarray(scores(enc, q, k, pos, pos))
  qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
  for i in range(9):
    for j in range(9):
      a = table[min(max(j - i, -3), 3) + 3]  # eq. 5
      want = (qn[0, i] * (kn[0, j] + a)).sum(-1)  # eq. 4 per head (q pre-scaled)
      np.testing.assert_allclose(got[0, :, i, j], want, rtol=1e-5, atol=1e-5)
  # pure position term (k = 0): every distance beyond k equals distance k
  rel = np.asarray(scores(enc, q, jnp.zeros_like(k), pos, pos))
  for i in range(5, 9):
    np.testing.assert_allclose(rel[0, :, i, 0], rel[0, :, i, i - 3], rtol=1e-6)
    assert not np.allclose(rel[0, :, i, i - 2], rel[0, :, i, i - 3])


def test_shaw_table_shared_across_heads_and_trainable():
  enc = make("shaw", max_distance=5, num_heads=4)
  params = nnx.state(enc, nnx.Param)
  assert [p.shape for p in jax.tree.leaves(params)] == [(11, 8)]


# ---------------------------------------------------------------- transformer_xl
def txl_direct(q, k, u, v, w_r, q_pos, k_pos):
  """Reference-style float64: ((q+u).k + (q+v).W_R R_{i-j}) / sqrt(d), q unscaled."""
  d_rel, d = w_r.shape[0], q.shape[-1]
  inv = 1.0 / 10000 ** (np.arange(0, d_rel, 2) / d_rel)
  out = np.zeros((q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
  for b in range(q.shape[0]):
    for i in range(q.shape[1]):
      for j in range(k.shape[1]):
        t = (q_pos[b, i] - k_pos[b, j]) * inv
        r = np.concatenate([np.sin(t), np.cos(t)])
        wr = np.einsum("r,rhd->hd", r, w_r)
        out[b, :, i, j] = ((q[b, i] + u) * k[b, j]).sum(-1) + ((q[b, i] + v) * wr).sum(-1)
  return out / math.sqrt(d)


def test_transformer_xl_hand_example():
  # h=1, d=2, d_rel=2 (w = 1): R_t = [sin t, cos t]. q=(1,0), k=(0,1), u=(0,2), v=(1,0),
  # W_R = identity, i - j = 1: (q+u).k = 2; (q+v).R_1 = 2 sin 1; logit = (2 + 2 sin 1)/sqrt(2)
  enc = make("transformer_xl", num_heads=1, head_dim=2, d_model=2, d_rel=2)
  enc.u[...] = jnp.asarray([[0.0, 2.0]])
  enc.v[...] = jnp.asarray([[1.0, 0.0]])
  enc.w_r[...] = jnp.eye(2)[:, None, :]
  q = jnp.asarray([[[[1.0, 0.0]]]]) / math.sqrt(2)  # the attention module pre-scales q
  k = jnp.asarray([[[[0.0, 1.0]]]])
  got = scores(enc, q, k, jnp.asarray([[7]]), jnp.asarray([[6]]))
  np.testing.assert_allclose(got[0, 0, 0, 0], (2 + 2 * math.sin(1)) / math.sqrt(2), rtol=1e-6)


def test_transformer_xl_matches_direct_formula_on_gapped_positions():
  enc = make("transformer_xl", d_rel=12)
  q, k = qk(2, 7, 2, 8, seed=3)
  pos = np.asarray([[0, 2, 3, 7, 8, 30, 31], [5, 6, 7, 8, 9, 10, 11]])
  want = txl_direct(np.asarray(q, np.float64), np.asarray(k, np.float64),
                    np.asarray(enc.u[...]), np.asarray(enc.v[...]),
                    np.asarray(enc.w_r[...], np.float64), pos, pos)
  got = scores(enc, q / math.sqrt(8), k, jnp.asarray(pos), jnp.asarray(pos))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_transformer_xl_block_equals_slice_of_full():
  enc = make("transformer_xl")
  q, k = qk(1, 24, 2, 8, seed=4)
  pos = jnp.arange(24)[None] + 100
  full = np.asarray(scores(enc, q, k, pos, pos))
  for (q0, q1), (k0, k1) in [((16, 24), (0, 8)), ((8, 16), (8, 16)), ((20, 24), (3, 21))]:
    block = scores(enc, q[:, q0:q1], k[:, k0:k1], pos[:, q0:q1], pos[:, k0:k1])
    np.testing.assert_allclose(block, full[:, :, q0:q1, k0:k1], rtol=1e-5, atol=1e-5)


def test_transformer_xl_params_and_d_rel_default():
  from configs.common import resolve
  from conftest import make_tiny_config
  c = resolve(make_tiny_config("transformer_xl"))
  assert c.posenc.transformer_xl.d_rel == c.model.d_model == 32
  enc = make("transformer_xl", d_rel=6)
  assert sorted(p.shape for p in jax.tree.leaves(nnx.state(enc, nnx.Param))) == [
      (2, 8), (2, 8), (6, 2, 8)]


# ---------------------------------------------------------------- xpos
def xpos_direct(q, k, n, m, head_dim, scale_base=512.0):
  """float64 sum_i zeta_i^((n-m)/sb) (R_n q . R_m k)_i for single vectors q, k [d]."""
  half = head_dim // 2
  zeta = (np.arange(0, head_dim, 2) + 0.4 * head_dim) / (1.4 * head_dim)
  theta = 1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)
  out = 0.0
  for i in range(half):  # rotate-half pairs (i, i + d/2); R_n q . R_m k = q . R_{m-n} k
    a, b = q[i], q[i + half]
    c, s = math.cos((m - n) * theta[i]), math.sin((m - n) * theta[i])
    out += zeta[i] ** ((n - m) / scale_base) * (a * (c * k[i] - s * k[i + half])
                                                + b * (s * k[i] + c * k[i + half]))
  return out


def test_xpos_zeta_matches_torchscale():
  # d = 8: (arange(0, 8, 2) + 3.2) / 11.2
  np.testing.assert_allclose(xpos_zeta(8), np.array([3.2, 5.2, 7.2, 9.2]) / 11.2, rtol=1e-7)


def test_xpos_without_decay_is_rope():
  rope, xpos = make("rope"), make("xpos", decay=False)
  rope.config.original_len = 0
  q, k = qk(2, 12, 2, 8, seed=5)
  pos = jnp.broadcast_to(jnp.arange(12) * 3, (2, 12))
  np.testing.assert_array_equal(logits(xpos, q, k, pos, pos), logits(rope, q, k, pos, pos))
  # with the decay on, logits differ from rope (and shrink for far pairs)
  assert not np.allclose(logits(make("xpos"), q, k, pos, pos), logits(rope, q, k, pos, pos))


@pytest.mark.parametrize("n0,m0", [(40, 0), (8192 - 16, 0), (8192 - 16, 8192 - 32),
                                   (65536 - 16, 0), (65536 - 16, 65536 - 400)])
def test_xpos_exact_and_finite_far_beyond_train_len(n0, m0):
  # 64x a train_len of 128 is 8192; 65536 stresses the float32 range
  enc = make("xpos")
  q, k = qk(1, 16, 2, 8, seed=6)
  q_pos, k_pos = jnp.arange(n0, n0 + 16)[None], jnp.arange(m0, m0 + 16)[None]
  got = logits(enc, q, k, q_pos, k_pos)
  assert np.isfinite(got).all()
  qn, kn = np.asarray(q, np.float64), np.asarray(k, np.float64)
  for i in (0, 7, 15):
    for j in (0, 9, 15):
      want = [xpos_direct(qn[0, i, h], kn[0, j, h], n0 + i, m0 + j, 8) for h in range(2)]
      # RoPE angles of positions ~65536 carry ~4e-3 rad of float32 error, as in rope
      np.testing.assert_allclose(got[0, :, i, j], want, rtol=2e-2, atol=2e-3)


def test_xpos_whole_sequence_finite_and_decaying():
  # full-sequence path at 8192 (64 x 128): decay factors exact, finite, product <= 1
  from posenc.xpos import decay_factors
  pos = jnp.arange(8192)[None]
  zeta = xpos_zeta(8)
  fq = np.asarray(decay_factors(pos, 4095.5, zeta, 512.0, 1.0))[0, :, 0, :4]
  fk = np.asarray(decay_factors(pos, 4095.5, zeta, 512.0, -1.0))[0, :, 0, :4]
  assert np.isfinite(fq).all() and np.isfinite(fk).all() and fq.min() > 0
  np.testing.assert_allclose(fq[8191] * fk[0], zeta ** (8191 / 512), rtol=1e-4)
  np.testing.assert_allclose(fq[100] * fk[100], np.ones(4), rtol=1e-5)
  assert (fq[8191] * fk[0] < fq[8191] * fk[4000]).all()


def test_xpos_gradients_finite_with_far_future_keys():
  # masked future pairs may overflow; the causal mask must keep gradients finite
  from models.attention import attend
  enc = make("xpos", scale_base=16.0)  # distance 2048 / 16 = 128: zeta_0^-128 overflows
  q, k = qk(1, 64, 2, 8, seed=7)
  pos = (jnp.arange(64) * 32)[None]
  def loss(q, k):
    qr, kr = enc.rotate(q, k, pos, pos)
    out, _ = attend(qr, kr, k, pos, pos, enc)
    return jnp.sum(out ** 2)
  raw = logits(enc, q, k, pos, pos)[0, 0]
  assert np.isfinite(raw[np.tril_indices(64)]).all() and not np.isfinite(raw).all()
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(q, k)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


# ---------------------------------------------------------------- sandwich
def sandwich_nemo(delta, num_heads, dim):
  """NeMo's formula in float64: (sum_{i=1}^{d/2} cos(delta / 1e4^(2i/d)) - d/2) / (8h/H)."""
  inv = 1.0 / 10000 ** (2 * np.arange(1, dim // 2 + 1) / dim)
  inner = np.cos(np.asarray(delta, np.float64)[..., None] * inv).sum(-1)
  h = np.arange(1, num_heads + 1)
  return (inner[None] - dim / 2) / (8 * h / num_heads).reshape((-1,) + (1,) * inner.ndim)


def test_sandwich_hand_example():
  # dim 4, 2 heads: w = 1e4^(-1/2) = 0.01 and 1e4^(-1) = 1e-4; distance 100:
  # inner = cos(1) + cos(0.01); head 1 divides by 8*1/2 = 4, head 2 by 8
  enc = make("sandwich", num_heads=2, dim=4)
  got = np.asarray(enc.bias(jnp.asarray([[100]]), jnp.asarray([[0]])))[0, :, 0, 0]
  inner = math.cos(1.0) + math.cos(0.01)
  np.testing.assert_allclose(got, [(inner - 2) / 4, (inner - 2) / 8], rtol=1e-5)
  np.testing.assert_allclose(sandwich_head_scales(4), [1 / 2, 1 / 4, 1 / 6, 1 / 8], rtol=1e-7)


def test_sandwich_matches_reference_formula_and_is_parameter_free():
  enc = make("sandwich", num_heads=4, head_dim=16)
  assert jax.tree.leaves(nnx.state(enc, nnx.Param)) == []
  pos = jnp.arange(0, 300, 3)[None]
  got = np.asarray(enc.bias(pos, pos))[0]
  delta = np.asarray(pos[0])[:, None] - np.asarray(pos[0])[None, :]
  np.testing.assert_allclose(got, sandwich_nemo(delta, 4, 16), rtol=1e-4, atol=1e-4)
  assert (got <= 0).all() and np.allclose(np.diagonal(got, axis1=1, axis2=2), 0, atol=1e-5)


def test_sandwich_decays_with_distance_in_expectation():
  enc = make("sandwich", num_heads=4, head_dim=32)
  far = jnp.arange(2048)[None]
  b = np.asarray(enc.bias(far[:, -1:], far))[0, :, 0, ::-1]  # [h, distance 0..2047]
  means = [b[:, lo:hi].mean() for lo, hi in [(0, 1), (1, 8), (8, 64), (64, 512), (512, 2048)]]
  assert all(x > y for x, y in zip(means, means[1:])), means
  # head 1 (largest scale) is the steepest, as ALiBi's first slope
  assert (b[0, 64:].mean() < b[1, 64:].mean() < b[3, 64:].mean())


# ---------------------------------------------------------------- training end to end
def test_train_and_evaluate_runs_transformer_xl(tmp_path):
  from conftest import make_tiny_config
  from train import train_and_evaluate
  c = make_tiny_config("transformer_xl", num_train_steps=5, log_every=5, eval_every=5,
                       checkpoint_every=5)
  state = train_and_evaluate(c, str(tmp_path))
  assert int(state["step"]) == 5
  rows = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert losses and all(np.isfinite(losses))
  assert any("eval/loss" in r for r in rows)


def test_sinusoidal_default_amplitude_is_the_papers_ratio():
  """Vaswani et al. sec. 3.4: embedding * sqrt(d) + unit sinusoids == embedding + PE / sqrt(d)."""
  import jax.numpy as jnp
  from flax import nnx
  from configs.common import resolve
  from configs.default import get_config
  from models import build_model
  import posenc as pe_mod
  c = resolve(get_config("posenc=sinusoidal"))
  assert c.posenc.sinusoidal.scale == pytest.approx(c.model.d_model ** -0.5)
  enc = pe_mod.build(get_config("posenc=sinusoidal").posenc, c.model, rngs=nnx.Rngs(0))
  x = jnp.zeros((1, 5, c.model.d_model))
  pos = jnp.arange(5)[None]
  out = enc.embed(x, pos)  # built from the unresolved config (scale 0): same amplitude
  expected = pe_mod.sinusoidal.sinusoidal_table(pos, c.model.d_model) / c.model.d_model ** 0.5
  assert jnp.allclose(out, expected, atol=1e-7)
  bad = get_config("posenc=sinusoidal")
  bad.posenc.sinusoidal.scale = -1.0
  with pytest.raises(ValueError, match="scale must be >= 0"):
    resolve(bad)
