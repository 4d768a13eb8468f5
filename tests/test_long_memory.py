"""Memory of long evaluations: XLA's scratch for one eval step, read from the compiled
program (``memory_analysis``; compile only, nothing runs), must not hold per-layer or
per-width buffers that a long window does not need."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks.step_memory import compiled_step
from configs.common import resolve
from models import build_model
from models.layers import map_chunks
from tests.conftest import make_tiny_config

SEQ, BLOCK, D, HEADS = 2048, 256, 64, 4


def eval_scratch_bytes(num_layers, mlp_chunk=0, mlp_dim=0):
  """Temp bytes of the compiled eval step of a blockwise model over one SEQ-token window."""
  c = make_tiny_config(train_len=SEQ, **{
      "model.num_layers": num_layers, "model.d_model": D, "model.num_heads": HEADS,
      "model.attention": "blockwise", "model.block_size": BLOCK, "model.mlp_chunk": mlp_chunk,
      "model.mlp_dim": mlp_dim})
  c = resolve(c)
  return compiled_step(c, 1, SEQ).memory_analysis().temp_size_in_bytes


@pytest.fixture
def xla_attention(monkeypatch):
  monkeypatch.setenv("LENX_CPU_ATTENTION", "xla")  # the blockwise path, not the fused kernel


def test_blockwise_outputs_are_not_all_allocated_up_front(xla_attention):
  """Each layer's blocked attention output is created when that layer runs: 4 layers need
  less than one extra output buffer of scratch over 1 layer (lax.map's zero-initialised
  outputs were all created at the program's start: 3 more buffers for 4 layers)."""
  one_output = SEQ * D * 4  # [b, s, h, d] float32
  extra = eval_scratch_bytes(4) - eval_scratch_bytes(1)
  assert extra < one_output, (extra, one_output)


def test_mlp_in_chunks_keeps_one_chunk_of_hidden_states(xla_attention):
  """With mlp_chunk = SEQ / 8 the MLP's [s, 2 * mlp_dim] hidden states exist one chunk at
  a time: the scratch drops by at least half of the full hidden states' bytes."""
  mlp_dim = 16 * D  # wide, so the MLP is the peak
  hidden = SEQ * 2 * mlp_dim * 4
  saved = eval_scratch_bytes(1, 0, mlp_dim) - eval_scratch_bytes(1, SEQ // 8, mlp_dim)
  assert saved > hidden / 2, (saved, hidden)


@pytest.mark.parametrize("s,chunk", [(10, 4), (12, 4), (3, 4), (9, 0)])
def test_map_chunks_equals_one_call(s, chunk):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, s, 3)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5)), jnp.float32)
  fn = lambda t: jnp.tanh(t @ w)
  np.testing.assert_allclose(map_chunks(fn, x, chunk), fn(x), rtol=1e-6, atol=1e-6)


def test_chunked_mlp_model_equals_unchunked():
  """A model whose norm + MLP run in chunks gives the logits of the same model without."""
  c = resolve(make_tiny_config(train_len=48, **{"model.mlp_chunk": 16}))
  chunked = build_model(c)
  plain = build_model(c)
  for blk in plain.blocks:
    blk.mlp_chunk = 0
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 40)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(40), (2, 40))
  np.testing.assert_allclose(chunked(tokens, pos), plain(tokens, pos), rtol=1e-5, atol=1e-5)


def test_late_buffers_do_not_spread_a_nan(xla_attention):
  """The data dependence of the loop buffers is ``like * 0``: a NaN in the output gradient's
  first element must not reach the gradients of keys that its query never saw (keys in
  later blocks), as it would if the accumulators started at NaN * 0."""
  from models.blockwise import blockwise_attend
  from posenc import build
  c = resolve(make_tiny_config(train_len=64))
  enc = build(c.posenc, c.model, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 64, 2, 8)), jnp.float32) for _ in range(3))
  pos = jnp.arange(64)[None]
  _, vjp = jax.vjp(lambda k: blockwise_attend(q, k, v, pos, pos, enc, block_size=16), k)
  g = jnp.ones((1, 64, 2, 8)).at[0, 0, 0, 0].set(jnp.nan)
  (dk,) = vjp(g)
  assert bool(jnp.isfinite(dk[:, 16:]).all())
