"""KERPLE (log, power), FIRE and CoPE: hand-computed numbers and defining properties."""
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import posenc
from configs.common import resolve
from configs.default import get_config
from models import build_model
from posenc.cope import cope_positions, interpolate_position_logits
from posenc.fire import fire_features

H = 2


def make(name, num_heads=H, head_dim=16, seed=0, **own):
  cfg = posenc.get(name).default_config()
  cfg.update(own)
  model_cfg = ml_collections.ConfigDict(dict(num_heads=num_heads, head_dim=head_dim,
                                             d_model=num_heads * head_dim))
  return posenc.get(name)(cfg, model_cfg, rngs=nnx.Rngs(params=seed))


def arange_pos(n, start=0, b=1):
  return jnp.broadcast_to(jnp.arange(start, start + n, dtype=jnp.int32), (b, n))


def sorted_random_pos(seed, b, n, max_len):
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.stack([np.sort(rng.choice(max_len, n, replace=False)) for _ in range(b)]))


# ---------------------------------------------------------------- KERPLE
def test_kerple_log_hand_numbers():
  enc = make("kerple_log")
  enc.r1[...] = jnp.array([1.0, 0.5])
  enc.r2[...] = jnp.array([1.0, 2.0])
  b = enc.bias(arange_pos(1, 3), arange_pos(4))[0, :, 0]  # query at 3, keys 0..3
  want = [[-math.log(4), -math.log(3), -math.log(2), 0.0],
          [-0.5 * math.log(7), -0.5 * math.log(5), -0.5 * math.log(3), 0.0]]
  np.testing.assert_allclose(b, want, rtol=1e-6, atol=1e-7)


def test_kerple_power_hand_numbers_and_clamps():
  enc = make("kerple_power")
  enc.r1[...] = jnp.array([1.0, 0.5])
  enc.r2[...] = jnp.array([1.0, 0.5])
  b = enc.bias(arange_pos(1, 4), arange_pos(5))[0, :, 0]  # distances 4, 3, 2, 1, 0
  np.testing.assert_allclose(b[0], [-4, -3, -2, -1, 0], rtol=1e-6)
  np.testing.assert_allclose(b[1], -0.5 * np.sqrt([4, 3, 2, 1, 0]), rtol=1e-6)
  enc.r1[...] = jnp.array([-3.0, 1.0])  # clamped up to eps = 0.01
  enc.r2[...] = jnp.array([3.0, -1.0])  # clamped to 2 and to eps
  b = enc.bias(arange_pos(1, 4), arange_pos(1))[0, :, 0, 0]  # distance 4
  np.testing.assert_allclose(b, [-0.01 * 16, -(4 ** 0.01)], rtol=1e-5)


def test_kerple_init_follows_reference_ranges():
  log, power = make("kerple_log", num_heads=64), make("kerple_power", num_heads=64)
  for p, hi in ((log.r1, 2), (log.r2, 1), (power.r1, 1), (power.r2, 2)):
    v = np.asarray(p[...])
    assert v.min() >= 0 and v.max() < hi and v.max() > 0.75 * hi, (v.min(), v.max(), hi)


@pytest.mark.parametrize("name", ["kerple_log", "kerple_power"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kerple_nonpositive_and_monotone(name, seed):
  enc = make(name, num_heads=8, seed=seed)
  b = np.asarray(enc.bias(arange_pos(1, 300), arange_pos(301)))[0, :, 0, ::-1]  # by distance
  assert (b <= 0).all() and np.all(b[:, 0] == 0)
  assert (np.diff(b, axis=-1) <= 0).all()  # non-increasing in distance
  assert (np.diff(b, axis=-1) < 0).any(axis=-1).all()  # and really decaying


@pytest.mark.parametrize("name", ["kerple_log", "kerple_power", "fire"])
def test_block_bias_equals_slice_of_full(name):
  enc = make(name, init_L=16.0) if name == "fire" else make(name)
  pos = sorted_random_pos(0, 2, 48, 200)  # gaps, and query positions past fire's L
  full = enc.bias(pos, pos)
  for qs, ks in ((slice(16, 32), slice(0, 16)), (slice(32, 48), slice(16, 48))):
    np.testing.assert_allclose(enc.bias(pos[:, qs], pos[:, ks]), full[:, :, qs, ks], rtol=1e-6)


@pytest.mark.parametrize("name", ["kerple_log", "kerple_power"])
def test_kerple_shift_invariant_and_gradients_finite(name):
  enc = make(name)
  pos = sorted_random_pos(1, 2, 16, 64)
  np.testing.assert_allclose(enc.bias(pos, pos), enc.bias(pos + 1000, pos + 1000), rtol=1e-6)
  enc.r2[...] = jnp.array([0.001, 0.5])  # head 0 below eps: straight-through keeps a gradient
  graphdef, state = nnx.split(enc)

  def total(state):
    return jnp.sum(nnx.merge(graphdef, state).bias(pos, pos))

  g = jax.grad(total)(state)
  r2_grad = np.asarray(g["r2"][...])
  assert np.isfinite(r2_grad).all() and (r2_grad != 0).all()


# ---------------------------------------------------------------- FIRE
def psi(x, c=0.1):
  return math.log(abs(c * x) + 1)


def test_fire_features_hand_values_use_max_not_min():
  q = jnp.array([[10, 10000, 5, 600]])
  k = jnp.array([[0, 9990, 5, 0]])
  got = np.diag(np.asarray(fire_features(q, k, 0.1, 512.0, eps=0.0))[0])
  want = [psi(10) / psi(512), psi(10) / psi(10000), 0.0, psi(600) / psi(600)]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  wrong_min = psi(10) / psi(512)  # min(L, i) at i = 10000 would divide by psi(512)
  assert abs(got[1] - wrong_min) > 0.05
  np.testing.assert_allclose(fire_features(q, k, -0.1, 512.0), fire_features(q, k, 0.1, 512.0))


def identity_mlp(enc):
  """f_theta(x) = relu(x) in every head (x >= 0 here): the bias shows the features."""
  w = enc.config.mlp_width
  enc.w1[...] = jnp.zeros((w,)).at[0].set(1.0)
  enc.b1[...] = jnp.zeros((w,))
  enc.w2[...] = jnp.zeros((w, H)).at[0].set(1.0)
  enc.b2[...] = jnp.zeros((H,))


def test_fire_bias_follows_normalisation_up_to_L():
  enc = make("fire", init_L=64.0)
  identity_mlp(enc)
  L = 64
  b = np.asarray(enc.bias(arange_pos(1, L), arange_pos(L + 1)))[0, 0, 0, ::-1]  # distance 0..L
  want = [psi(d) / (psi(L) + 1e-6) for d in range(L + 1)]
  np.testing.assert_allclose(b, want, rtol=1e-5)
  assert b[0] == 0 and abs(b[-1] - 1) < 1e-5 and (np.diff(b) > 0).all()
  # past the threshold the normaliser is psi(i): distance i still maps to 1
  b = np.asarray(enc.bias(arange_pos(1, 4 * L), arange_pos(1)))[0, 0, 0, 0]
  np.testing.assert_allclose(b, 1.0, rtol=1e-5)


def test_fire_mlp_shape_and_init_as_paper():
  enc = make("fire")
  assert enc.w1[...].shape == (32,) and enc.w2[...].shape == (32, H)
  assert float(enc.c[...]) == pytest.approx(0.1) and float(enc.threshold()) == 512.0
  assert np.abs(enc.w2[...]).max() <= 1 / math.sqrt(32)  # torch Linear init bound


def test_fire_shift_invariant_below_L_only():
  enc = make("fire", init_L=100.0)
  assert not posenc.get("fire").relative  # the normaliser reads the query position
  pos = arange_pos(40, b=2)
  base = enc.bias(pos, pos)
  np.testing.assert_allclose(enc.bias(pos + 50, pos + 50), base, rtol=1e-5, atol=1e-6)
  assert np.abs(enc.bias(pos + 500, pos + 500) - base).max() > 1e-3


def test_fire_threshold_is_learned():
  enc = make("fire", init_L=8.0)
  graphdef, state = nnx.split(enc)
  pos = arange_pos(32)

  def total(state):
    return jnp.sum(nnx.merge(graphdef, state).bias(pos, pos) ** 2)

  g = jax.grad(total)(state)
  assert float(g["L_multiplier"][...]) != 0 and float(g["c"][...]) != 0


# ---------------------------------------------------------------- CoPE
def test_cope_positions_reverse_cumsum_of_gates():
  big = 100.0  # above the diagonal: must be ignored
  ln3 = math.log(3)
  logits = jnp.array([[0.0, big, big], [0.0, 0.0, big], [ln3, 0.0, -ln3]])[None, None]
  p = np.asarray(cope_positions(logits, npos=64))[0, 0]
  want = [[0.5, 0, 0], [1.0, 0.5, 0], [1.5, 0.75, 0.25]]  # sum_{t=j..i} g_it
  np.testing.assert_allclose(p, want, rtol=1e-6)


def test_cope_positions_clamp_at_npos_minus_one():
  p = np.asarray(cope_positions(jnp.full((1, 1, 10, 10), 30.0), npos=4))[0, 0]
  np.testing.assert_allclose(p[9], np.minimum(10 - np.arange(10), 3), rtol=1e-6)
  assert p.max() == 3


def test_cope_interpolates_between_floor_and_ceil():
  table = jnp.zeros((5, 4)).at[:, 0].set(jnp.arange(5.0) ** 2)  # q . e[n] = n^2
  q = jnp.zeros((1, 1, 1, 4)).at[..., 0].set(1.0)
  p = jnp.array([0.0, 1.5, 2.25, 4.0])[None, None, None]
  z = np.asarray(interpolate_position_logits(q, table, p))[0, 0, 0]
  np.testing.assert_allclose(z, [0.0, 2.5, 4 + 0.25 * 5, 16.0], rtol=1e-6)


def test_cope_scores_and_flags():
  enc = make("cope", npos=8)
  assert posenc.get("cope").blockwise is False
  q, k = jax.random.normal(jax.random.key(0), (2, 2, 6, H, 16))
  pos = arange_pos(6, b=2)
  np.testing.assert_allclose(enc.scores(q, k, pos, pos), posenc.base.qk_dot(q, k), rtol=1e-6)
  enc.table[...] = jax.random.normal(jax.random.key(1), (8, 16))
  logits = posenc.base.qk_dot(q, k)
  want = logits + interpolate_position_logits(q, enc.table[...], cope_positions(logits, 8))
  np.testing.assert_allclose(enc.scores(q, k, pos, pos), want, rtol=1e-6)


def test_cope_causal_in_a_small_model():
  c = get_config("posenc=cope,data=markov,train_len=16")
  c.model.num_layers, c.model.d_model, c.model.num_heads = 1, 32, 2
  c.posenc.cope.npos = 8
  model = build_model(resolve(c))
  model.posenc.table[...] = jax.random.normal(jax.random.key(3), (8, 16))
  toks = jax.random.randint(jax.random.key(0), (2, 16), 0, 256)
  changed = toks.at[:, 9:].set((toks[:, 9:] + 7) % 256)
  pos = arange_pos(16, b=2)
  forward = nnx.jit(lambda m, t, p: m(t, p))
  a, b = forward(model, toks, pos), forward(model, changed, pos)
  np.testing.assert_allclose(a[:, :9], b[:, :9], rtol=1e-5, atol=1e-5)
  assert np.abs(a[:, 9:] - b[:, 9:]).max() > 1e-3


# ---------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", ["kerple_log", "cope"])
def test_tiny_training_run(name, tmp_path):
  from train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  c = get_config(f"posenc={name},data=markov,train_len=32")
  c.model.num_layers, c.model.d_model, c.model.num_heads = 1, 32, 2
  c.batch_size, c.num_train_steps, c.eval_tokens = 4, 5, 256
  c.log_every, c.eval_every, c.checkpoint_every = 5, 5, 5
  state = train_and_evaluate(c, str(tmp_path))
  assert int(state["step"]) == 5
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  losses = [r[k] for r in rows for k in ("train/loss", "eval/loss") if k in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
