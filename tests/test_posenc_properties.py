"""Properties every registered encoding must have. Parametrised over
``posenc.names()``, so a new file under posenc/ is tested without editing this one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import posenc
from configs.common import resolve
from models import build_model

NAMES = posenc.names()
TRAIN_LEN = 16


def _config(name, tiny_config):
  return resolve(tiny_config(posenc=name, train_len=TRAIN_LEN, **{"model.num_layers": 2}))


def _encoding(name, tiny_config):
  config = _config(name, tiny_config)
  return posenc.build(config.posenc, config.model, rngs=nnx.Rngs(3)), config


def _qk(config, s, seed=0):
  shape = (2, s, config.model.num_heads, config.model.head_dim)
  kq, kk = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kq, shape), jax.random.normal(kk, shape)


def _scores(enc, q, k, pos):
  qr, kr = enc.rotate(q, k, pos, pos)
  return enc.scores(qr, kr, pos, pos)


@pytest.mark.parametrize("name", NAMES)
def test_causal_logits_never_see_the_future(name, tiny_config):
  model = build_model(_config(name, tiny_config))
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 0, 256)
  pos = jnp.broadcast_to(jnp.arange(24), (2, 24))
  t = 11
  changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 7) % 256)
  a, b = model(tokens, pos), model(changed, pos)
  np.testing.assert_allclose(a[:, :t + 1], b[:, :t + 1], atol=1e-5)
  assert not np.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_jit_shapes_and_finite_at_16x_train_len(name, tiny_config):
  model = build_model(_config(name, tiny_config))
  graphdef, state = nnx.split(model)
  length = 16 * TRAIN_LEN
  tokens = jax.random.randint(jax.random.key(1), (1, length), 0, 256)
  pos = jnp.arange(length)[None]
  logits = jax.jit(lambda s, x, p: nnx.merge(graphdef, s)(x, p))(state, tokens, pos)
  assert logits.shape == (1, length, 256)
  assert np.isfinite(np.asarray(logits)).all()


# Encodings with blockwise=False (CoPE: a query needs its whole row of gates) are
# evaluated on the full path; tests/test_blockwise.py checks that fallback.
@pytest.mark.parametrize("name", [n for n in NAMES if posenc.get(n).blockwise])
def test_block_scores_equal_slice_of_full(name, tiny_config):
  enc, config = _encoding(name, tiny_config)
  s = 40
  q, k = _qk(config, s)
  pos = jnp.broadcast_to(jnp.arange(s) + 5, (2, s))
  qr, kr = enc.rotate(q, k, pos, pos)
  full = enc.scores(qr, kr, pos, pos)
  for (q0, q1), (k0, k1) in [((8, 24), (0, 16)), ((24, 40), (24, 40)), ((33, 40), (3, 10))]:
    block = enc.scores(qr[:, q0:q1], kr[:, k0:k1], pos[:, q0:q1], pos[:, k0:k1])
    np.testing.assert_allclose(block, full[:, :, q0:q1, k0:k1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in NAMES if posenc.get(n).relative])
def test_relative_logits_invariant_to_shifting_positions(name, tiny_config):
  enc, config = _encoding(name, tiny_config)
  q, k = _qk(config, 12, seed=4)
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  np.testing.assert_allclose(_scores(enc, q, k, pos), _scores(enc, q, k, pos + 101),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_model_state_is_only_trainable_params(name, tiny_config):
  # Training updates every array in params; constants must be static attributes.
  from flax import nnx as _nnx
  model = build_model(_config(name, tiny_config))
  _, _, rest = _nnx.split(model, _nnx.Param, ...)
  assert not jax.tree.leaves(rest)
