"""Sliding and non-overlapping evaluation against brute-force per-token computation.

The brute force scores target x_t of a document from exactly the context its window
should give it, x[start(t) : t], right-padded (padding after t cannot matter in a
causal model, but any leak of later tokens or an off-by-one in the window would).
A tiny random RoPE model with enlarged weights makes the loss depend strongly on the
context, so a wrong context changes the numbers.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.common import resolve
from configs.default import get_config
from evaluation import runner, windows
from input_pipeline import base
from models import build_model
from models.loss import token_nll

L = 8
DOCS = [np.random.default_rng(i).integers(0, 256, n).astype(np.uint8)
        for i, n in enumerate([30, 5, 9, 17])]


class FakeText(base.Task):
  name, is_text = "fake", True

  def eval_docs(self, split):
    return DOCS

  def eval_batches(self, split, length, batch_size, max_tokens=None):
    return base.batched_eval(DOCS, length, batch_size, max_tokens)


@pytest.fixture(scope="module")
def model():
  c = get_config(f"posenc=rope,train_len={L}")
  c.model.num_layers, c.model.d_model, c.model.num_heads = 1, 32, 2
  m = build_model(resolve(c))
  params = nnx.state(m, nnx.Param)
  nnx.update(m, jax.tree.map(lambda p: p * 25.0, params))  # peaky, context-dependent outputs
  return m


def brute_force(model, start_of):
  """{(doc, t): nll of x_t given x[start_of(doc, t) : t]} for every target t >= 1."""
  keys, inputs, targets, idx = [], [], [], []
  for d, doc in enumerate(DOCS):
    for t in range(1, len(doc)):
      s = start_of(len(doc), t)
      ctx = np.zeros(L, np.int32)
      ctx[:t - s] = doc[s:t]
      tgt = np.zeros(L, np.int32)
      tgt[t - s - 1] = doc[t]
      keys.append((d, t)), inputs.append(ctx), targets.append(tgt), idx.append(t - s - 1)
  x, y = jnp.asarray(np.stack(inputs)), jnp.asarray(np.stack(targets))
  pos = jnp.broadcast_to(jnp.arange(L), x.shape)
  nll = np.asarray(token_nll(model, model.features(x, pos)[0], y))
  return {k: float(nll[i, j]) for i, (k, j) in enumerate(zip(keys, idx))}


def windowed(model, batches):
  """{(doc, t): nll} from eval batches; fails if a target is scored twice."""
  fn, state = runner.make_eval_fn(model, with_correct=False)
  out = {}
  for b in batches:
    nll = np.asarray(fn(state, b["inputs"], b["targets"], b["positions"])["nll"])
    for r, c in zip(*np.nonzero(b["loss_mask"])):
      key = (int(b["doc_id"][r]), int(b["offset"][r]) + int(c) + 1)
      assert key not in out, f"target {key} scored twice"
      out[key] = float(nll[r, c])
  return out


def sliding_start(stride):
  """start(t) = 0 if t <= L else min(ceil((t - L) / S) * S, n - 1 - L) (windows.py docstring)."""
  return lambda n, t: 0 if t <= L else min(math.ceil((t - L) / stride) * stride, n - 1 - L)


@pytest.mark.parametrize("stride", [1, 3, L])
def test_sliding_equals_brute_force(model, stride):
  # stride 1: each target sees exactly the previous min(t, L) tokens, independent of windows.
  start = (lambda n, t: max(0, t - L)) if stride == 1 else sliding_start(stride)
  expected = brute_force(model, start)
  got = windowed(model, windows.sliding_batches(DOCS, L, stride, batch_size=3))
  assert set(got) == set(expected)  # every target exactly once (duplicates fail above)
  np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), rtol=2e-5)
  assert np.std(list(expected.values())) > 0.5  # the model is context-sensitive
  for d, t in expected:
    ctx = t - start(len(DOCS[d]), t)
    assert start(len(DOCS[d]), t) == 0 or ctx >= L - stride + 1
  row = runner.evaluate(model, FakeText(0), length=L, mode="sliding", stride=stride,
                        batch_size=3, stats_windows=0)
  assert row["tokens"] == sum(len(d) - 1 for d in DOCS)
  assert row["nll"] == pytest.approx(np.mean(list(expected.values())), rel=1e-5)


def test_sliding_differs_from_nonoverlapping(model):
  slide = brute_force(model, sliding_start(2))
  cut = brute_force(model, lambda n, t: (t - 1) // L * L)
  assert max(abs(slide[k] - cut[k]) for k in slide) > 0.1


def test_sliding_max_tokens_takes_whole_windows():
  wins = list(windows.sliding_windows(DOCS, L, 3, max_tokens=20))
  scored = sum(w[4] - w[3] for w in wins)
  assert scored <= 20 and scored + 3 > 20  # the next window (3 new targets) would overflow


def test_nonoverlapping_weights_every_token_equally(model):
  expected = brute_force(model, lambda n, t: (t - 1) // L * L)
  row = runner.evaluate(model, FakeText(0), length=L, mode="nonoverlapping",
                        batch_size=4, stats_windows=0)
  token_mean = np.mean(list(expected.values()))
  assert row["tokens"] == len(expected)
  assert row["nll"] == pytest.approx(token_mean, rel=1e-5)
  # Windows of 8, 8, 8, 5 | 4 | 8 | 8, 8 targets: a mean of window means weights them differently.
  by_window = {}
  for (d, t), v in expected.items():
    by_window.setdefault((d, (t - 1) // L), []).append(v)
  window_mean = np.mean([np.mean(v) for v in by_window.values()])
  assert abs(window_mean - token_mean) > 1e-3
  assert row["nll"] != pytest.approx(window_mean, rel=1e-5)


def test_rows_with_the_same_program_share_one_compile():
  """A second seed (same config, other parameters) reuses the first's executable, and gets
  its own numbers; a config that changes the program (RoPE base) compiles its own."""
  def config(seed, base=10000.0):
    c = get_config(f"posenc=rope,train_len={L}")
    c.model.num_layers, c.model.d_model, c.model.num_heads, c.seed = 1, 32, 2, seed
    c.posenc.rope.base = base
    return resolve(c)

  def row(c, key):
    return runner.evaluate(build_model(c), FakeText(0), length=L, batch_size=4,
                           stats_windows=1, key=key)

  first = row(config(0), runner.program_key(config(0)))
  reused = row(config(1), runner.program_key(config(1)))
  fresh = row(config(1), None)
  assert runner.program_key(config(0)) == runner.program_key(config(1))
  assert reused["compile_s"] == 0.0 and fresh["compile_s"] > 0.0
  assert reused["nll"] == fresh["nll"] != first["nll"]
  assert reused["attn_entropy"] == fresh["attn_entropy"] != first["attn_entropy"]
  other = config(1, base=10.0)
  assert runner.program_key(other) != runner.program_key(config(1))
  moved = row(other, runner.program_key(other))
  assert moved["compile_s"] > 0.0 and moved["nll"] != reused["nll"]


def test_attention_statistics_past_the_full_path_memory_limit(monkeypatch):
  """Long windows get their attention statistics blockwise (O(block) memory), equal to the
  full path's; only a full-path model whose probabilities would not fit goes without."""
  monkeypatch.setenv("LENX_CPU_ATTENTION", "xla")  # XLA's two paths (the kernel: below)

  def stats(attention, block_size=8):
    c = get_config(f"posenc=alibi,train_len={L}")
    c.model.update(num_layers=1, d_model=32, num_heads=2, attention=attention,
                   block_size=block_size)
    batch = {"inputs": np.arange(40, dtype=np.int32)[None] % 7,
             "positions": np.arange(40, dtype=np.int32)[None],
             "loss_mask": np.ones((1, 40), np.float32)}
    return runner.attention_stats(build_model(resolve(c)), batch, 1)

  full, blockwise = stats("full"), stats("auto")  # 40 tokens > 2 blocks of 8: blockwise
  assert blockwise["attn_entropy"] == pytest.approx(full["attn_entropy"], rel=1e-5)
  assert blockwise["attn_distance"] == pytest.approx(full["attn_distance"], rel=1e-5)
  monkeypatch.setattr(runner, "STATS_MAX_BYTES", 2 * 40 * 40 * 4 - 1)
  assert stats("full") == {} and stats("auto")["attn_entropy"] == blockwise["attn_entropy"]


@pytest.mark.parametrize("posenc", ["rope", "t5_bias"])
def test_kernel_rows_take_attention_statistics_from_the_evaluation_program(monkeypatch, posenc):
  """Where the fused CPU kernel runs, a row's attention statistics come out of its one
  evaluation program (no program of their own: no ``stats_s``), equal to those of XLA's
  separate statistics program on the same first windows; the scores are unchanged."""
  c = get_config(f"posenc={posenc},train_len={L}")
  c.model.num_layers, c.model.d_model, c.model.num_heads = 2, 32, 2
  model = build_model(resolve(c))
  rows = {}
  for choice in ("xla", "kernel"):
    monkeypatch.setenv("LENX_CPU_ATTENTION", choice)
    rows[choice] = runner.evaluate(model, FakeText(0), length=16, batch_size=3, stats_windows=2)
  xla, kernel = rows["xla"], rows["kernel"]
  assert "stats_s" in xla and "stats_s" not in kernel and kernel["attn_windows"] == 2
  assert runner.fused_stats(model, 16) and not runner.fused_stats(model, 12)  # 12 % 8 != 0
  assert kernel["nll"] == pytest.approx(xla["nll"], rel=1e-6)
  for field in ("attn_entropy", "attn_distance"):
    assert kernel[field] == pytest.approx(xla[field], rel=1e-5)
