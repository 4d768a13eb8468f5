"""Context-extension methods after 2023 (extensions/): each method's defining property on a
small hand-computed case, blockwise == full for every variant, composition and errors,
PoSE positions, the DroPE fine-tune config."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import extensions
from configs.common import resolve
from extensions import NotApplicable, Variant, apply_variant, parse_variants, piecewise
from input_pipeline import positions
from models import build_model
from models import blockwise, cpu_attention
from models.attention import attend, full_attend
from models.blockwise import blockwise_attend
from posenc.base import qk_dot
from posenc.rope import apply_rope, rope_frequencies

INV_FREQ, _ = rope_frequencies(16)
ROT = lambda x, p: apply_rope(x, p, INV_FREQ)


def _qk(s, seed=0):
  kq, kk = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kq, (1, s, 2, 16)), jax.random.normal(kk, (1, s, 2, 16))


def _rule(name, **params):
  return json.dumps({"name": name, **params})


def _rel(rule, s):
  """(relative positions, attended) of a rule on positions 0..s-1, as numpy [s, s]."""
  pos = jnp.arange(s)[None]
  rel, attended = piecewise.relative_positions(rule, pos, pos)
  return np.asarray(rel)[0, 0], np.asarray(attended)[0, 0]


def _row(rule, s, i):
  rel, attended = _rel(rule, s)
  return [int(r) if a else None for r, a in zip(rel[i, :i + 1], attended[i, :i + 1])]


# ---------------------------------------------------------------- defining matrices
def test_self_extend_positions_normal_inside_window_grouped_beyond():
  # G=2, w_n=4, query 9: keys 6..9 at true distance; beyond, 9//2 + 4 - 4//2 - k//2
  assert _row(_rule("self_extend", group=2, window=4), 10, 9) == [6, 6, 5, 5, 4, 4, 3, 2, 1, 0]


def test_self_extend_merged_logits_are_normal_then_grouped():
  g, w, s = 3, 5, 20
  q, k = _qk(s)
  pos = jnp.arange(s)[None]
  merged = np.asarray(piecewise.scores(_rule("self_extend", group=g, window=w), q, k, pos, pos, ROT))
  normal = np.asarray(qk_dot(ROT(q, pos), ROT(k, pos)))
  grouped = np.asarray(qk_dot(ROT(q, pos // g + w - w // g), ROT(k, pos // g)))
  rel = np.subtract.outer(np.arange(s), np.arange(s))
  near, far = (rel >= 0) & (rel < w), rel >= w
  np.testing.assert_allclose(merged[..., near], normal[..., near], atol=1e-5)
  np.testing.assert_allclose(merged[..., far], grouped[..., far], atol=1e-5)
  assert not np.allclose(merged[..., far], normal[..., far], atol=1e-3)


def test_self_extend_auto_group_keeps_distances_below_train_len(tiny_config):
  run = resolve(tiny_config(posenc="rope", train_len=32))
  for n in (32, 100, 1000):
    p = json.loads(apply_variant(run, Variant("self_extend"), n).variant_resolved)["self_extend"]
    assert p["window"] == 8
    rel, _ = _rel(_rule("self_extend", **p), n)
    assert rel[np.tril_indices(n)].max() <= 31
    if n > 32:  # and the group is the smallest that does so
      q = (n - 1) // (p["group"] - 1) + 8 - 8 // (p["group"] - 1)
      assert q > 31
  assert p["group"] == 42  # 999 // 42 + 8 - 0 = 31, 999 // 41 + 8 = 32; ~ (L - w) / (N - w)


def test_dual_chunk_positions_per_part_match_the_reference_formulas():
  # chunk_size 6, local_window 2 -> s = 4; keys at k % 4; query 9 (chunk 2, 9 % 4 = 1):
  # intra (keys 8, 9): 1 - k%4; successive (4..7): min(1 + 4, 6) = 5 - k%4;
  # inter (0..3): min(2*4 - 1, 6) = 6 - k%4
  rule = _rule("dual_chunk", chunk_size=6, local_window=2)
  assert _row(rule, 12, 9) == [6, 5, 4, 3, 5, 4, 3, 2, 1, 0]
  assert _row(rule, 12, 7) == [6, 5, 4, 3, 3, 2, 1, 0]  # succ: min(3 + 4, 6) = 6
  assert _row(rule, 12, 3) == [3, 2, 1, 0]  # first chunk: ordinary RoPE
  rel, _ = _rel(rule, 64)
  assert rel[np.tril_indices(64)].max() <= 6  # never beyond chunk_size


def test_string_shifted_index_matrix():
  # S=4, W=1: distances >= 4 become d - 4 + 1
  rule = _rule("string", shift=4, local=1)
  rel, attended = _rel(rule, 8)
  expect = np.array([[i - j if i - j < 4 else i - j - 3 for j in range(8)] for i in range(8)])
  low = np.tril_indices(8)
  np.testing.assert_array_equal(rel[low], expect[low])
  assert attended[low].all()


def test_lm_infinite_lambda_mask_and_distance_limit():
  # 2 sinks, local window 3, limit 3: query 7 sees keys 0, 1 (at distance 3) and 5, 6, 7
  rule = _rule("lm_infinite", n_global=2, n_local=3, limit=3)
  assert _row(rule, 8, 7) == [3, 3, None, None, None, 2, 1, 0]
  assert _row(rule, 8, 2) == [2, 1, 0]


def test_streaming_llm_attends_sinks_and_window_at_cache_positions():
  # 2 sinks + 2 recent: query 7 sits at cache position 4; sinks at 0, 1; recent keep distance
  rule = _rule("streaming_llm", sinks=2, recent=2)
  assert _row(rule, 8, 7) == [4, 3, None, None, None, 2, 1, 0]
  assert _row(rule, 8, 3) == [3, 2, 1, 0]  # cache not full yet: plain RoPE


def test_rerope_caps_distances_at_the_window():
  assert _row(_rule("rerope", window=3), 6, 5) == [3, 3, 3, 2, 1, 0]


@pytest.mark.parametrize("rule", [
    _rule("rerope", window=3), _rule("self_extend", group=2, window=3),
    _rule("dual_chunk", chunk_size=5, local_window=1), _rule("string", shift=5, local=2),
    _rule("lm_infinite", n_global=1, n_local=4, limit=6),
    _rule("streaming_llm", sinks=1, recent=3)])
def test_scores_are_rope_logits_at_the_relative_positions(rule):
  """Every attended pair gets R(P_ij) q_i . k_j (RoPE depends on the difference only)."""
  s = 14
  q, k = _qk(s, seed=1)
  pos = jnp.arange(s)[None]
  got = np.asarray(piecewise.scores(rule, q, k, pos, pos, ROT))[0]
  rel, attended = _rel(rule, s)
  for j in range(s):
    want = np.asarray(qk_dot(ROT(q, jnp.asarray(rel[None, :, j])), k[:, j:j + 1]))[0, :, :, 0]
    rows = np.arange(s) >= j
    np.testing.assert_allclose(got[:, rows & attended[:, j], j], want[:, rows & attended[:, j]],
                               atol=1e-4)
    assert (got[:, rows & ~attended[:, j], j] < -1e29).all()


# ---------------------------------------------------------------- frequencies
@pytest.fixture
def rope_run(tiny_config):
  return resolve(tiny_config(posenc="rope", train_len=32, **{"model.head_dim": 32}))


def _inv(run, spec, n=256):
  return np.asarray(build_model(apply_variant(run, parse_variants(spec)[0], n)).posenc.inv_freq)


def test_resonance_wavelengths_are_integers_and_compose_with_yarn(rope_run):
  for spec in ("resonance", "resonance+yarn", "yarn+resonance:factor=4"):
    wavelengths = 2 * np.pi / _inv(rope_run, spec).astype(np.float64)
    np.testing.assert_allclose(wavelengths, np.round(wavelengths), rtol=1e-5)
  yarn, res_yarn = _inv(rope_run, "yarn"), _inv(rope_run, "resonance+yarn")
  np.testing.assert_allclose(2 * np.pi / res_yarn, np.round(2 * np.pi / yarn), rtol=1e-5)
  assert not np.allclose(res_yarn, _inv(rope_run, "resonance"))  # the yarn part applied


def test_p_rope_leaves_the_lowest_frequencies_as_identity(rope_run):
  base, half = _inv(rope_run, "none"), _inv(rope_run, "p_rope:p=0.5")  # 16 frequencies
  np.testing.assert_array_equal(half[:8], base[:8])  # highest 8 rotate as before
  np.testing.assert_array_equal(half[8:], 0.0)
  enc = build_model(apply_variant(rope_run, parse_variants("p_rope:p=0.5")[0], 64)).posenc
  q, k = (jax.random.normal(jax.random.key(i), (1, 9, 2, 32)) for i in (0, 1))
  pos = jnp.arange(9)[None] * 7
  qr, _ = enc.rotate(q, k, pos, pos)
  still = np.r_[8:16, 24:32]  # rotate-half pairs (i, i + 16) of the zeroed frequencies
  np.testing.assert_allclose(qr[..., still], q[..., still], atol=1e-6)
  assert not np.allclose(qr[..., :8], q[..., :8], atol=1e-3)
  # a training option too: the same frequencies from the encoding's config
  rope_run.posenc.rope.p_fraction = 0.5
  np.testing.assert_array_equal(build_model(rope_run).posenc.inv_freq, half)


def test_ntk_by_parts_is_yarn_without_temperature(rope_run):
  parts = build_model(apply_variant(rope_run, Variant("ntk_by_parts"), 256)).posenc
  yarn = build_model(apply_variant(rope_run, Variant("yarn"), 256)).posenc
  np.testing.assert_array_equal(parts.inv_freq, yarn.inv_freq)
  assert parts.attention_factor == 1.0 and yarn.attention_factor > 1.0


# ---------------------------------------------------------------- blockwise == full
VARIANTS = ["rerope:window=6", "self_extend:window=6", "dual_chunk", "string",
            "lm_infinite:n_local=12,limit=12", "lm_infinite:n_global=0,n_local=12",
            "streaming_llm:recent=9", "ntk_by_parts", "resonance+yarn", "p_rope",
            "resonance+self_extend:window=4"]


@pytest.mark.parametrize("spec", VARIANTS)
def test_blockwise_equals_full(spec, tiny_config):
  run = resolve(tiny_config(posenc="rope", train_len=16))
  enc = build_model(apply_variant(run, parse_variants(spec)[0], 128)).posenc
  r = np.random.RandomState(0)
  for s, block in ((37, 8), (64, 16)):
    q, k, v = (jnp.asarray(r.randn(2, s, enc.num_heads, enc.head_dim), jnp.float32)
               for _ in range(3))
    pos = jnp.broadcast_to(jnp.arange(s) * 2 + 5, (2, s))  # offset, gapped position ids
    q, k = enc.rotate(q, k, pos, pos)
    full = full_attend(q, k, v, pos, pos, enc)[0]
    out = attend(q, k, v, pos, pos, enc, impl="blockwise", block_size=block)[0]
    assert float(jnp.max(jnp.abs(out - full)) / jnp.max(jnp.abs(full))) < 1e-5, (spec, s)


# ---------------------------------------------------------------- the fused CPU kernel
# Parameters that put part borders inside the kernel's tiles (128 queries x 256 keys) and
# leave whole tiles to one part or masked, at 520 tokens (partial blocks at the end).
KERNEL_VARIANTS = ["self_extend:window=100,group=3", "rerope:window=300",
                   "dual_chunk:chunk_size=200,local_window=40", "string:shift=150,local=20",
                   "lm_infinite:n_global=4,n_local=200,limit=150",
                   "lm_infinite:n_global=0,n_local=130", "streaming_llm:sinks=4,recent=300",
                   "resonance+self_extend:window=64"]


def _kernel_rule_parts(pieces, q_pos, k_pos):
  """The part of every pair as the kernel computes it from ``pieces`` (a numpy re-statement
  of causal_attention.cc's Pieces::part)."""
  _, _, div, sinks, near, sink = pieces
  cls = np.clip(q_pos[:, None] // div - k_pos[None, :] // div, 0, len(near) - 1)
  return np.where(k_pos[None, :] < sinks, np.asarray(sink)[cls], np.asarray(near)[cls])


KERNEL_METHODS = [n for n in extensions.names()  # every method that declares a kernel_form
                  if getattr(type(extensions.get(n)), "kernel_form",
                             piecewise.PiecewiseRoPE.kernel_form)
                  is not piecewise.PiecewiseRoPE.kernel_form]


@pytest.mark.parametrize("spec", KERNEL_VARIANTS + KERNEL_METHODS)  # + their defaults
def test_kernel_rule_is_the_methods_select(spec, tiny_config):
  """The kernel's class tables (read off ``select`` at one pair per class) give every
  causal pair the part ``select`` gives it, at contiguous, offset and gapped positions far
  past the tables: for every registered piecewise method at its defaults too, so a new
  method's ``kernel_form`` is checked without touching this file."""
  run = resolve(tiny_config(posenc="rope", train_len=256))
  enc = build_model(apply_variant(run, parse_variants(spec)[0], 4096)).posenc
  ext, params = piecewise.load_rule(enc.scores_rule)
  pieces = piecewise.kernel_pieces(enc.scores_rule, *_qk(8), jnp.arange(8)[None],
                                   jnp.arange(8)[None], ROT)[2]
  r = np.random.RandomState(1)
  for pos in (np.arange(1500), np.arange(1500) + 37, np.sort(r.choice(6000, 1500, replace=False))):
    want = np.asarray(ext.select(params, pos[:, None], pos[None, :]))
    got = _kernel_rule_parts(pieces, pos, pos)
    causal = np.tril(np.ones((len(pos),) * 2, bool))
    np.testing.assert_array_equal(got[causal], want[causal])
    assert len(set(want[causal].ravel())) > 1  # the test spans a border


def _kernel_vs_xla(enc, q, k, v, pos, monkeypatch, rows=0):
  """attend's (out, stats) with the kernel, then with XLA's blockwise path."""
  results = []
  for choice in ("kernel", "xla"):
    monkeypatch.setenv("LENX_CPU_ATTENTION", choice)
    results.append(attend(q, k, v, pos, pos, enc, with_stats=rows, impl="blockwise",
                          block_size=64))
  return results


@pytest.mark.parametrize("spec", KERNEL_VARIANTS)
def test_kernel_equals_xla_for_piecewise_methods(spec, tiny_config, monkeypatch):
  """float32: the fused kernel's output and attention statistics equal XLA's blockwise
  piecewise path (to float32 rounding), at offset, gapped positions (the rule reads
  positions, never indices)."""
  run = resolve(tiny_config(posenc="rope", train_len=256, **{"model.head_dim": 16}))
  enc = build_model(apply_variant(run, parse_variants(spec)[0], 1024)).posenc
  monkeypatch.setenv("LENX_CPU_ATTENTION", "kernel")
  x = jax.ShapeDtypeStruct((1, 520, enc.num_heads, enc.head_dim), jnp.float32)
  assert cpu_attention.use_kernel(x, x, enc)
  r = np.random.RandomState(2)
  q, k, v = (jnp.asarray(r.randn(2, 520, enc.num_heads, enc.head_dim) * 1.5, jnp.float32)
             for _ in range(3))
  pos = jnp.broadcast_to(jnp.arange(520) * 2 + 3, (2, 520))
  (out, stats), (want, want_stats) = _kernel_vs_xla(enc, q, k, v, pos, monkeypatch, rows=1)
  scale = float(jnp.max(jnp.abs(want)))
  assert float(jnp.max(jnp.abs(out - want))) < 4e-6 * scale, spec
  for name in ("entropy", "distance"):
    np.testing.assert_allclose(stats[name], want_stats[name], rtol=1e-5)


@pytest.mark.parametrize("posenc, spec", [("rope", "none"), ("alibi", "none"),
                                          ("rope", "self_extend:window=100,group=3")])
def test_a_length_off_the_kernels_tile_multiple_runs_in_the_kernel_padded(
    posenc, spec, tiny_config, monkeypatch):
  """A chunk of 517 tokens (a needle prompt ends where its answer starts) runs in the fused
  kernel, padded at the end to 520 (it had fallen back to XLA's path): the output equals
  XLA's, and so do the gradients (the padding is sliced off before they flow back)."""
  run = resolve(tiny_config(posenc=posenc, train_len=256, **{"model.head_dim": 16}))
  enc = build_model(apply_variant(run, parse_variants(spec)[0], 1024)).posenc
  r = np.random.RandomState(4)
  q, k, v, g = (jnp.asarray(r.randn(2, 517, 2, 16), jnp.float32) for _ in range(4))
  pos = jnp.broadcast_to(jnp.arange(517) + 5, (2, 517))
  loss = lambda q, k, v: jnp.sum(attend(q, k, v, pos, pos, enc, impl="blockwise",
                                        block_size=64)[0] * g)
  got = {}
  for choice in ("kernel", "xla"):
    monkeypatch.setenv("LENX_CPU_ATTENTION", choice)
    out = attend(q, k, v, pos, pos, enc, impl="blockwise", block_size=64)[0]
    traced = str(jax.make_jaxpr(lambda *x: attend(*x, pos, pos, enc)[0])(q, k, v))
    got[choice] = out, jax.grad(loss, (0, 1, 2))(q, k, v), "lenx_causal_attention" in traced
  (out, grads, used), (want, want_grads, used_xla) = got["kernel"], got["xla"]
  assert out.shape == q.shape and used and not used_xla
  scale = float(jnp.max(jnp.abs(want)))
  assert float(jnp.max(jnp.abs(out - want))) < 4e-6 * scale
  for a, b in zip(grads, want_grads):
    assert float(jnp.max(jnp.abs(a - b))) < 1e-5 * float(jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("spec", ["self_extend:window=100,group=3", "streaming_llm:sinks=4,recent=300",
                                  "dual_chunk:chunk_size=200,local_window=40"])
def test_bf16_kernel_equals_xla_bf16_and_gradients_are_xlas(spec, tiny_config, monkeypatch):
  """bfloat16: the kernel = XLA's bf16 piecewise attention to bf16 rounding; under a
  gradient the XLA path runs (the kernel has no backward for piecewise logits), in both
  dtypes, so gradients equal XLA's exactly."""
  run = resolve(tiny_config(posenc="rope", train_len=256, **{"model.head_dim": 16}))
  enc = build_model(apply_variant(run, parse_variants(spec)[0], 1024)).posenc
  r = np.random.RandomState(3)
  q, k, v = (jnp.asarray(r.randn(1, 520, enc.num_heads, enc.head_dim) * 1.5, jnp.bfloat16)
             for _ in range(3))
  pos = jnp.arange(520)[None]
  (out, _), (want, _) = _kernel_vs_xla(enc, q, k, v, pos, monkeypatch)
  assert float(jnp.max(jnp.abs(out - want)) / jnp.max(jnp.abs(want))) < 1e-2
  for dtype in (jnp.float32, jnp.bfloat16):
    qkv = [t.astype(dtype) for t in (q, k, v)]
    grads = []
    for choice in ("kernel", "xla"):
      monkeypatch.setenv("LENX_CPU_ATTENTION", choice)
      loss = lambda *x: jnp.sum(attend(*x, pos, pos, enc, impl="blockwise", block_size=64)[0]
                                * v.astype(jnp.float32))
      grads.append(jax.grad(loss, (0, 1, 2))(*qkv))
    for got, want in zip(*grads):
      np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("spec", ["lm_infinite:n_global=4,n_local=12", "streaming_llm:sinks=4,recent=11"])
def test_lambda_masks_skip_the_tiles_they_remove(spec, tiny_config, monkeypatch):
  """Blockwise attention computes, forward and backward, exactly the causal tiles that hold
  an attended pair of the method's own matrix (sinks + window: O(L x window) work), and
  its output and gradients still equal full attention's."""
  run = resolve(tiny_config(posenc="rope", train_len=16))
  enc = build_model(apply_variant(run, parse_variants(spec)[0], 128)).posenc
  s, block = 64, 8
  attended = np.asarray(piecewise.relative_positions(
      enc.scores_rule, jnp.arange(s)[None], jnp.arange(s)[None])[1])[0, 0]
  tiles = attended.reshape(s // block, block, s // block, block).any(axis=(1, 3))
  expected = int(np.tril(tiles).sum())
  assert expected <= (s // block) * (s // block + 1) // 2 - 10  # far tiles are masked out
  calls = []
  tile_logits = blockwise._tile_logits
  def counted(*args):
    jax.debug.callback(lambda: calls.append(1))
    return tile_logits(*args)
  monkeypatch.setattr(blockwise, "_tile_logits", counted)
  r = np.random.RandomState(0)
  q, k, v = (jnp.asarray(r.randn(1, s, enc.num_heads, enc.head_dim), jnp.float32)
             for _ in range(3))
  pos = jnp.arange(s)[None]
  loss = lambda f: lambda *qkv: jnp.sum(f(*qkv) * v)
  full = jax.value_and_grad(loss(lambda *x: full_attend(*x, pos, pos, enc)[0]), (0, 1, 2))
  tiled = jax.value_and_grad(loss(lambda *x: blockwise_attend(*x, pos, pos, enc, block)),
                             (0, 1, 2))
  (want, want_grads), (got, got_grads) = full(q, k, v), tiled(q, k, v)
  jax.effects_barrier()
  assert len(calls) == 2 * expected  # forward + backward
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=1e-4 * float(jnp.max(jnp.abs(w))))


@pytest.mark.parametrize("spec", ["self_extend:window=20", "rerope:window=20",
                                  "dual_chunk:chunk_size=24,local_window=4",
                                  "lm_infinite:n_global=4,n_local=12"])
def test_a_tile_of_one_part_computes_only_that_parts_logits(spec, tiny_config, monkeypatch):
  """Blockwise, a tile whose attended pairs all take one part runs one q.k product; a tile
  where parts meet runs every part's (the values: test_blockwise_equals_full)."""
  run = resolve(tiny_config(posenc="rope", train_len=32))
  enc = build_model(apply_variant(run, parse_variants(spec)[0], 128)).posenc
  ext, params = piecewise.load_rule(enc.scores_rule)
  s, block, n_parts = 64, 8, len(ext.parts(params))
  pos = np.arange(s)
  part = np.asarray(ext.select(params, pos[:, None], pos[None, :]))
  expected = 0
  for i in range(s // block):
    for j in range(i + 1):
      used = set(part[i * block:(i + 1) * block, j * block:(j + 1) * block].ravel()) - {-1}
      expected += 0 if not used else 1 if len(used) == 1 else n_parts
  calls = []
  qk = piecewise.qk_dot
  def counted(q, k):
    jax.debug.callback(lambda: calls.append(1))
    return qk(q, k)
  monkeypatch.setattr(piecewise, "qk_dot", counted)
  x = jnp.asarray(np.random.RandomState(0).randn(1, s, enc.num_heads, enc.head_dim), jnp.float32)
  p = jnp.asarray(pos)[None]
  jax.block_until_ready(blockwise_attend(x, x, x, p, p, enc, block))
  jax.effects_barrier()
  assert len(calls) == expected < n_parts * (s // block) * (s // block + 1) // 2


def test_only_the_lambda_methods_declare_a_mask(rope_run):
  """``masks`` (which lets blockwise attention skip tiles) is set exactly where ``select``
  can say "not attended" (at ~10x the training length, default parameters)."""
  pos = jnp.arange(300)[None]
  causal = np.tril(np.ones((300, 300), bool))
  checked = []
  for name in extensions.names():
    ext = extensions.get(name)
    if isinstance(ext, piecewise.PiecewiseRoPE):
      rule = apply_variant(rope_run, Variant(name), 300).posenc.rope.scores_rule
      attended = np.asarray(piecewise.relative_positions(rule, pos, pos)[1])[0, 0]
      assert bool(np.any(causal & ~attended)) == ext.masks, name
      checked.append(name)
  assert {"lm_infinite", "streaming_llm", "self_extend", "rerope"} <= set(checked)


# ---------------------------------------------------------------- parsing and applicability
def test_every_registered_method_parses_and_records_resolved_params(rope_run):
  for name in extensions.names():
    config = apply_variant(rope_run, Variant(name), 128)
    assert name in json.loads(config.variant_resolved)
  c = apply_variant(rope_run, parse_variants("resonance+yarn:factor=8,beta_fast=16")[0], 128)
  resolved = json.loads(c.variant_resolved)
  assert resolved["yarn"]["factor"] == 8 and resolved["yarn"]["beta_fast"] == 16
  assert c.posenc.rope.resonance is True


def test_bad_compositions_and_keys_fail_naming_the_choices(rope_run):
  with pytest.raises(ValueError, match="parameter 'group' of variant 'yarn' is unknown; valid "
                                       "keys: .*beta_fast"):
    parse_variants("yarn:group=2")
  with pytest.raises(ValueError, match="more than one frequency scaling"):
    parse_variants("yarn+ntk")
  with pytest.raises(ValueError, match="more than one piecewise method"):
    parse_variants("self_extend+rerope")
  with pytest.raises(ValueError, match="unknown variant 'selfextend'; valid choices: .*self_extend"):
    parse_variants("selfextend")
  with pytest.raises(ValueError, match="must be an integer >= 1"):
    apply_variant(rope_run, parse_variants("self_extend:window=0")[0], 128)
  with pytest.raises(ValueError, match="local=20 must be < shift=10"):
    apply_variant(rope_run, parse_variants("string:shift=10,local=20")[0], 128)


@pytest.mark.parametrize("spec", ["self_extend", "dual_chunk", "string", "lm_infinite",
                                  "streaming_llm", "ntk_by_parts", "resonance+yarn", "p_rope"])
def test_rope_methods_are_skipped_on_a_non_rope_run(spec, tiny_config):
  run = resolve(tiny_config(posenc="alibi"))
  with pytest.raises(NotApplicable, match="needs a RoPE encoding; run uses 'alibi'"):
    apply_variant(run, parse_variants(spec)[0], 128)


# ---------------------------------------------------------------- PoSE
@pytest.mark.parametrize("chunks", [2, 3])
def test_pose_positions_are_monotone_start_at_zero_and_stay_below_the_target(chunks):
  cfg = positions.default_positions_config()
  cfg.update(kind="pose", max_len=256, pose_chunks=chunks)
  positions.validate(cfg, 32)
  ids = np.concatenate([positions.train_positions(cfg, 8, 32, 0, step) for step in range(20)])
  assert (ids[:, 0] == 0).all() and (np.diff(ids, axis=1) >= 1).all() and ids.max() <= 255
  assert ((np.diff(ids, axis=1) > 1).sum(1) <= chunks - 1).all()  # one skip per chunk border
  assert ids.max() > 128  # skips do reach toward the target length
  np.testing.assert_array_equal(positions.train_positions(cfg, 8, 32, 0, 3),
                                positions.train_positions(cfg, 8, 32, 0, 3))  # pure in step
  assert positions.largest_position(cfg, 32) == 255


def test_pose_needs_a_target_at_least_the_window(tiny_config):
  with pytest.raises(ValueError, match="positions.max_len=16 is smaller than train_len=32"):
    resolve(tiny_config(posenc="rope", train_len=32, **{"positions.kind": "pose",
                                                         "positions.max_len": 16}))


# ---------------------------------------------------------------- DroPE
def test_drope_finetune_drops_rope_and_keeps_every_parameter(tmp_path, tiny_config):
  from configs import finetune
  from training.checkpoint import write_config
  from training.steps import split_model
  run = resolve(tiny_config(posenc="rope", train_len=32))
  write_config(str(tmp_path), run)
  c = resolve(finetune.get_config(f"init_from={tmp_path},train_len=32,variant=none,drope=1"))
  assert c.posenc.name == "nope" and c.train_len == 32
  shapes = lambda cfg: jax.tree.map(jnp.shape, split_model(build_model(cfg))[1])
  assert shapes(c) == shapes(run)
  with pytest.raises(ValueError, match="drope=1 takes variant=none"):
    finetune.get_config(f"init_from={tmp_path},train_len=32,variant=yarn,drope=1")
