"""Defining properties of the foundation encodings, against hand-derived numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import posenc
from configs.common import resolve
from models import build_model
from posenc.alibi import alibi_slopes
from posenc.rope import apply_rope, rope_frequencies
from posenc.t5_bias import relative_position_bucket


def test_alibi_slopes_power_of_two():
  # Press et al. 2022 sec. 3: 8 heads -> 1/2, 1/4, ..., 1/256
  np.testing.assert_allclose(alibi_slopes(8), [2.0**-i for i in range(1, 9)], rtol=1e-7)
  # 16 heads: start 2^(-8/16) = 2^-0.5, ratio 2^-0.5
  np.testing.assert_allclose(alibi_slopes(16), [2.0**(-0.5 * i) for i in range(1, 17)], rtol=1e-6)


def test_alibi_slopes_non_power_of_two():
  # 6 heads: the 4-head slopes (2^-2, 2^-4, 2^-6, 2^-8), then every other slope of the
  # 8-head sequence (2^-1, 2^-3, 2^-5, 2^-7) truncated to the 2 missing heads.
  np.testing.assert_allclose(alibi_slopes(6), [2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3])
  # 12 heads: 8-head slopes + 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 (every other of 16)
  expected = [2.0**-i for i in range(1, 9)] + [2.0**-(i + 0.5) for i in range(4)]
  np.testing.assert_allclose(alibi_slopes(12), expected, rtol=1e-6)


def test_t5_buckets_against_hand_values():
  # Causal (bidirectional=False), 32 buckets, max_distance 128: distances 0..15 exact;
  # n >= 16 -> 16 + floor(log(n/16) / log(128/16) * 16), capped at 31.
  rel = -jnp.array([0, 1, 15, 16, 20, 31, 32, 64, 127, 128, 1000])
  expected = [0, 1, 15, 16, 17, 21, 21, 26, 31, 31, 31]
  # n=20: log(1.25)/log(8)*16 = 1.716 -> 17; n=32: log 2/log 8*16 = 5.33 -> 21
  # n=31: log(1.9375)/log8*16 = 5.09 -> 21; n=64: 10.67 -> 26; n=127: 15.96 -> 31
  np.testing.assert_array_equal(relative_position_bucket(rel, False, 32, 128), expected)
  # future keys (positive relative position) all map to bucket 0 when causal
  assert int(relative_position_bucket(jnp.array(5), False, 32, 128)) == 0


def test_t5_buckets_bidirectional():
  # half the buckets for each direction; keys after the query get +16
  rel = jnp.array([-3, 3, 0, 100])
  # -3 -> n=3 -> 3; +3 -> 16 + 3; 0 -> 0; +100: 16 + 8 + floor(log(100/8)/log(16)*8)=16+8+7=31
  np.testing.assert_array_equal(relative_position_bucket(rel, True, 32, 128), [3, 19, 0, 31])


def _qk(seed, b=1, s=6, h=2, d=8):
  kq, kk = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kq, (b, s, h, d)), jax.random.normal(kk, (b, s, h, d))


def test_rope_score_depends_only_on_position_difference():
  q, k = _qk(0)
  inv_freq, _ = rope_frequencies(8)
  pos = jnp.arange(6)[None]

  def scores(offset):
    qr, kr = apply_rope(q, pos + offset, inv_freq), apply_rope(k, pos + offset, inv_freq)
    return jnp.einsum("bqhd,bkhd->bhqk", qr, kr)

  np.testing.assert_allclose(scores(0), scores(1000), atol=2e-4)
  assert not np.allclose(scores(0), jnp.einsum("bqhd,bkhd->bhqk", q, k), atol=1e-2)


def test_rope_preserves_norms_and_uses_rotate_half_layout():
  q, _ = _qk(1)
  inv_freq, _ = rope_frequencies(8)
  pos = jnp.arange(6)[None] * 7
  out = apply_rope(q, pos, inv_freq)
  np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(q, axis=-1), rtol=1e-5)
  # rotate-half: dim 0 pairs with dim d/2 (= 4) at frequency inv_freq[0] = 1
  theta = 7.0 * 1  # position 7 (row 1)
  x = q[0, 1, 0]
  np.testing.assert_allclose(out[0, 1, 0, 0], x[0] * np.cos(theta) - x[4] * np.sin(theta), rtol=1e-5)
  np.testing.assert_allclose(out[0, 1, 0, 4], x[4] * np.cos(theta) + x[0] * np.sin(theta), rtol=1e-5)


@pytest.mark.parametrize("name", ["alibi", "t5_bias"])
def test_bias_depends_only_on_position_difference(name, tiny_config):
  config = resolve(tiny_config(posenc=name, **{"model.num_heads": 4}))
  enc = posenc.build(config.posenc, config.model, rngs=nnx.Rngs(0))
  pos = jnp.arange(40)[None]
  np.testing.assert_allclose(enc.bias(pos, pos), enc.bias(pos + 333, pos + 333), atol=1e-6)


def test_alibi_bias_is_minus_slope_times_distance(tiny_config):
  config = resolve(tiny_config(posenc="alibi", **{"model.num_heads": 4}))
  enc = posenc.build(config.posenc, config.model, rngs=nnx.Rngs(0))
  pos = jnp.arange(5)[None]
  b = enc.bias(pos, pos)
  assert float(b[0, 0, 4, 1]) == pytest.approx(-0.25 * 3)  # 4 heads: slopes 1/4, 1/16, ...
  assert float(b[0, 3, 4, 0]) == pytest.approx(-(2.0**-8) * 4)


def test_learned_table_past_max_len_raises(tiny_config):
  config = resolve(tiny_config(posenc="learned", **{"posenc.learned.max_len": 64}))
  model = build_model(config)
  tokens = jnp.zeros((1, 65), jnp.int32)
  with pytest.raises(ValueError, match="supports positions 0..63 but got position 64"):
    model(tokens, jnp.arange(65)[None])
  model(tokens[:, :64], jnp.arange(64)[None])  # fits exactly
  # under jit positions are traced: out-of-range rows give NaN, never a clamped row
  graphdef, state = nnx.split(model)
  f = jax.jit(lambda s, t, p: nnx.merge(graphdef, s)(t, p))
  assert np.isnan(np.asarray(f(state, tokens, jnp.arange(65)[None]))[0, 64]).all()


def test_unknown_encoding_names_choices():
  with pytest.raises(ValueError, match="unknown positional encoding 'ropee'; valid choices: .*alibi"):
    posenc.get("ropee")
