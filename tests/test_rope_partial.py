"""RoPE's ``partial_rotary_factor`` (GPT-J / GPT-NeoX / Hugging Face): only the first
rotary_dim = int(head_dim * factor) dims of each head rotate; the rest pass through."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import posenc
from configs.common import resolve
from conftest import make_tiny_config
from posenc.rope import apply_rope, rotate_half
from posenc.rope_scaling import rope_frequencies


def _rope(factor, head_dim=32):
  c = resolve(make_tiny_config("rope", **{"model.head_dim": head_dim,
                                          "posenc.rope.partial_rotary_factor": factor}))
  return posenc.build(c.posenc, c.model, rngs=nnx.Rngs(0))


def _qk(s=12, h=2, d=32, seed=0):
  kq, kk = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kq, (2, s, h, d)), jax.random.normal(kk, (2, s, h, d))


def test_quarter_rotary_leaves_last_75_percent_untouched():
  enc = _rope(0.25)
  assert len(enc.inv_freq) == 4  # rotary_dim 8 of 32 -> 4 frequencies
  q, k = _qk()
  pos = jnp.broadcast_to(jnp.arange(12) + 3, (2, 12))
  qr, kr = enc.rotate(q, k, pos, pos)
  np.testing.assert_array_equal(qr[..., 8:], q[..., 8:])
  np.testing.assert_array_equal(kr[..., 8:], k[..., 8:])
  # the first 25% rotate exactly as a full RoPE of head_dim 8 with base 10000
  inv8, _ = rope_frequencies(8, 10000.0)
  np.testing.assert_allclose(enc.inv_freq, inv8, rtol=1e-7)
  np.testing.assert_allclose(qr[..., :8], apply_rope(q[..., :8], pos, inv8), rtol=1e-6, atol=1e-6)
  assert not np.allclose(qr[..., :8], q[..., :8], atol=1e-3)


def test_quarter_rotary_hand_values():
  # head_dim 8, factor 0.5 -> rotary_dim 4, theta = [1, 0.01]; position 2, x = e_0:
  # dims (0, 2) form pair 0: (cos 2, sin 2) at dims 0 and 2; dims 4..7 untouched
  x = jnp.zeros((1, 1, 1, 8)).at[..., 0].set(1.0).at[..., 5].set(3.0)
  inv, _ = rope_frequencies(8, 10000.0, {"rope_type": "default", "partial_rotary_factor": 0.5})
  out = np.asarray(apply_rope(x, jnp.asarray([[2]]), inv))[0, 0, 0]
  np.testing.assert_allclose(out, [np.cos(2), 0, np.sin(2), 0, 0, 3, 0, 0], atol=1e-6)


@pytest.mark.parametrize("factor", [0.25, 0.5])
def test_partial_rotary_logits_are_relative(factor):
  enc = _rope(factor)
  q, k = _qk(seed=1)
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  def logits(p):
    qr, kr = enc.rotate(q, k, p, p)
    return np.asarray(enc.scores(qr, kr, p, p))
  np.testing.assert_allclose(logits(pos), logits(pos + 500), rtol=1e-4, atol=1e-4)


def test_invalid_partial_factor_is_rejected():
  with pytest.raises(ValueError, match="partial_rotary_factor"):
    _rope(0.01)  # int(32 * 0.01) = 0 rotary dims


def test_rotate_half_pairs():
  np.testing.assert_array_equal(rotate_half(jnp.asarray([1.0, 2.0, 3.0, 4.0])), [-3, -4, 1, 2])
