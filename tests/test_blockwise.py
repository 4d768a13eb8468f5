"""Blockwise attention (models/blockwise.py) equals full attention for every
registered encoding, never builds an L x L array, and the loss head is chunked."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import posenc
from configs.common import resolve
from configs.default import get_config
from models import build_model
from models.attention import attend, full_attend, use_blockwise
from models.blockwise import blockwise_attend, blockwise_stats
from training.steps import make_eval_step, split_model

CASES = ((37, 8), (64, 16), (45, 64))  # (length, block): non-multiples too


def tiny_model(name, **model):
  c = get_config(f"posenc={name},train_len=64,data=copy")
  c.model.update(num_layers=1, d_model=32, num_heads=2, **model)
  return build_model(resolve(c))


def qkv(enc, s, b=2, seed=0):
  r = np.random.RandomState(seed)
  q, k, v = (jnp.asarray(r.randn(b, s, enc.num_heads, enc.head_dim), jnp.float32)
             for _ in range(3))
  pos = jnp.broadcast_to(jnp.arange(s) * 2 + 5, (b, s))  # offset, gapped position ids
  q, k = enc.rotate(q, k, pos, pos)
  return q * enc.head_dim ** -0.5, k, v, pos


def rel_err(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("name", posenc.names())
def test_blockwise_equals_full(name):
  enc = tiny_model(name).posenc
  for s, block in CASES:
    q, k, v, pos = qkv(enc, s)
    both = jax.jit(lambda q, k, v, p: (full_attend(q, k, v, p, p, enc)[0], attend(
        q, k, v, p, p, enc, impl="blockwise", block_size=block)[0]))
    full, out = both(q, k, v, pos)
    if not enc.blockwise:  # CoPE-like: must fall back to the full path, bit for bit
      assert not use_blockwise("blockwise", s, block, enc)
      np.testing.assert_array_equal(out, full)
      continue
    assert use_blockwise("blockwise", s, block, enc)
    assert rel_err(out, full) < 1e-5, (name, s, block)


BLOCKWISE = [n for n in posenc.names() if tiny_model(n).posenc.blockwise]


@pytest.mark.parametrize("name", BLOCKWISE)
def test_blockwise_statistics_equal_the_full_probabilities(name):
  """Attention entropy and distance accumulated online (blockwise_stats) equal those of
  the materialised probabilities (full_attend), and attend() with stats takes that path."""
  enc = tiny_model(name).posenc
  for s, block in CASES[:1]:  # 37 tokens in 5 blocks of 8 (one compile per encoding: suite time)
    q, k, v, pos = qkv(enc, s, seed=s)
    full_out, full = full_attend(q, k, v, pos, pos, enc, with_stats=True)
    out, stats = jax.jit(lambda q, k, v, p: blockwise_stats(q, k, v, p, p, enc, block))(q, k, v, pos)
    assert rel_err(out, full_out) < 1e-5
    for key in ("entropy", "distance"):
      assert abs(float(stats[key]) - float(full[key])) < 1e-5 * max(1.0, abs(float(full[key]))), (
          name, s, block, key, float(stats[key]), float(full[key]))
    via_attend = attend(q, k, v, pos, pos, enc, with_stats=True, impl="blockwise",
                        block_size=block)[1]
    assert float(via_attend["distance"]) == pytest.approx(float(stats["distance"]), rel=1e-6)


@pytest.mark.parametrize("impl", ["full", "blockwise"])
def test_statistics_of_the_first_rows_are_those_rows_alone(impl, monkeypatch):
  """attend(with_stats=n) off the fused kernel (XLA's path; without statistics a length
  off the kernel's tiles is padded into it): the output of the whole batch, the statistics
  of its first n rows only, as the kernel computes them."""
  monkeypatch.setenv("LENX_CPU_ATTENTION", "xla")
  enc = tiny_model("alibi").posenc
  q, k, v, pos = qkv(enc, 37, b=3, seed=1)
  call = lambda *a, **kw: attend(*a, enc, impl=impl, block_size=8, **kw)
  out, first = call(q, k, v, pos, pos, with_stats=1)
  np.testing.assert_array_equal(out, call(q, k, v, pos, pos)[0])
  alone = call(q[:1], k[:1], v[:1], pos[:1], pos[:1], with_stats=True)[1]
  whole = call(q, k, v, pos, pos, with_stats=True)[1]
  for key in ("entropy", "distance"):
    assert float(first[key]) == pytest.approx(float(alone[key]), rel=1e-6)
  assert abs(float(whole["entropy"]) - float(first["entropy"])) > 1e-4  # other rows differ


def test_statistics_distinguish_sharp_from_flat_attention():
  """A defining check: uniform attention over n keys has entropy log n and mean distance
  (n - 1) / 2 per row; attention to the newest key only, entropy 0 and distance 0."""
  enc = tiny_model("nope").posenc
  s, h, d = 48, enc.num_heads, enc.head_dim
  pos = jnp.arange(s)[None]
  v = jnp.ones((1, s, h, d))
  flat = jnp.zeros((1, s, h, d))
  _, uniform = blockwise_stats(flat, flat, v, pos, pos, enc, 16)
  n = np.arange(1, s + 1)
  assert float(uniform["entropy"]) == pytest.approx(np.mean(np.log(n)), rel=1e-5)
  assert float(uniform["distance"]) == pytest.approx(np.mean((n - 1) / 2), rel=1e-5)
  key = jnp.asarray(np.eye(d)[None, :, None, :] * 1e3, jnp.float32).repeat(h, axis=2)
  pos = pos[:, :d]
  _, sharp = blockwise_stats(key, key, v[:, :d], pos, pos, enc, 4)  # row i matches only key i
  assert float(sharp["entropy"]) < 1e-3 and float(sharp["distance"]) < 1e-3


@pytest.mark.parametrize("name", BLOCKWISE)
def test_gradients_match(name):
  """The hand-written flash backward equals autodiff of full attention, for q, k, v and
  the encoding's own parameters (T5/Shaw tables, FIRE's MLP, KERPLE's, ...)."""
  enc = tiny_model(name).posenc
  q, k, v, pos = qkv(enc, 40)
  graphdef, state = nnx.split(enc)

  def loss(attn, q, k, v, state):
    e = nnx.merge(graphdef, state)
    return jnp.sum(jnp.sin(attn(q, k, v, pos, pos, e)))

  full = lambda *a: full_attend(*a)[0]
  blk = lambda *a: blockwise_attend(*a, block_size=16)
  g_full = jax.grad(functools.partial(loss, full), argnums=(0, 1, 2, 3))(q, k, v, state)
  g_blk = jax.grad(functools.partial(loss, blk), argnums=(0, 1, 2, 3))(q, k, v, state)
  for a, b in zip(jax.tree.leaves(g_blk), jax.tree.leaves(g_full)):
    # relative, with an absolute floor for gradients that are ~0 (float32 sums of O(1)
    # terms: e.g. FIRE's threshold, ~1e-6 either way)
    assert float(jnp.max(jnp.abs(a - b))) < 1e-5 * max(float(jnp.max(jnp.abs(b))), 1.0)


def test_backward_memory_is_linear_in_length():
  """Under grad, blockwise attention's scratch grows like L (q, k, v saved by blocks),
  not like a key-block copy per (query block, key block) pair."""
  enc = tiny_model("alibi").posenc

  def temp_per_q_byte(L):
    q, k, v, pos = qkv(enc, L, b=1)
    loss = lambda q, k, v, p: jnp.sum(blockwise_attend(q, k, v, p, p, enc, 64))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v, pos).compile()
    return grad.memory_analysis().temp_size_in_bytes / q.nbytes

  small, large = temp_per_q_byte(1024), temp_per_q_byte(2048)
  # flash backward: ~5x q's bytes at both lengths; autodiff of the scan with remat: 24x;
  # autodiff indexing closed-over key blocks: 610 -> 2253
  assert large < 1.2 * small and large < 10, (small, large)


def test_auto_switches_on_length_and_rejects_unknown():
  enc = tiny_model("rope").posenc
  assert not use_blockwise("auto", 1024, 512, enc)
  assert use_blockwise("auto", 1025, 512, enc)
  assert not use_blockwise("full", 10**6, 512, enc)
  with pytest.raises(ValueError, match="valid choices: auto, full, blockwise"):
    use_blockwise("flash", 10, 4, enc)


def largest_array(hlo_text):
  """Largest element count of any tensor type in StableHLO text."""
  dims = re.findall(r"tensor<((?:\d+x)+)[a-z]", hlo_text)
  return max(int(np.prod([int(x) for x in d.rstrip("x").split("x")])) for d in dims)


def test_no_quadratic_buffer():
  L, block = 4096, 256
  enc = tiny_model("alibi").posenc
  x = jax.ShapeDtypeStruct((1, L, enc.num_heads, 16), jnp.float32)
  pos = jax.ShapeDtypeStruct((1, L), jnp.int32)
  full = jax.jit(lambda q, k, v, p: full_attend(q, k, v, p, p, enc)[0]).lower(x, x, x, pos)
  blk = jax.jit(lambda q, k, v, p: blockwise_attend(q, k, v, p, p, enc, block)).lower(x, x, x, pos)
  assert largest_array(full.as_text()) >= L * L  # the detector sees the full path's matrix
  assert largest_array(blk.as_text()) < L * L // 8
  temp = blk.compile().memory_analysis().temp_size_in_bytes
  assert temp < L * L * 4 // 8, temp  # scratch is O(L * block), not O(L^2)


def test_loss_head_is_chunked():
  """token_nll (used by train and eval steps) never holds [b, L, vocab] logits at once."""
  model = tiny_model("rope", attention="auto", block_size=256)
  graphdef, params = split_model(model)
  L = 8192  # > token_nll's chunk of 2048
  batch = {"inputs": jax.ShapeDtypeStruct((1, L), jnp.int32),
           "targets": jax.ShapeDtypeStruct((1, L), jnp.int32),
           "positions": jax.ShapeDtypeStruct((1, L), jnp.int32),
           "loss_mask": jax.ShapeDtypeStruct((1, L), jnp.float32)}
  text = make_eval_step(graphdef).lower(params, batch).as_text()
  assert largest_array(text) < L * 256  # vocab 256: no full [1, L, vocab] logits anywhere
  assert "tensor<1x2048x256xf32>" in text  # one chunk of logits at a time
