"""The fused CPU attention kernel (models/cpu_attention.py): same numbers as XLA's path,
causal, and used exactly where it applies."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import cpu_attention
from models.fast_attention import softmax_pv
from posenc.base import qk_dot
from tests.test_fast_paths import _model_loss, _rel


# kernel vs XLA's float32 attention (relative to the largest |value|): both round, and
# XLA's rounding differs between CPU classes (its dots are YNNPACK's with AVX-512, Eigen's
# without): at s = 520 both are within 0.7-1.7e-6 of the float64 answer, 2.0e-6 apart
VS_XLA = 4e-6


def _xla(q, k, v):
  return softmax_pv(qk_dot(q, k), v, 0, jnp.float32)


def _float64_attention(q, k, v, round_p=False):
  """Causal softmax(q k^T) v in float64 (numpy): the exact answer both float32 paths round.
  round_p: what the bf16 forward computes for s <= one key block (256): S from the bf16
  values (products exact in float32), P = exp(S - row max) rounded to bf16 for P V, the row
  sum of P and the division in float (not rounded)."""
  q, k, v = (np.asarray(jnp.asarray(t).astype(jnp.float32), np.float64) for t in (q, k, v))
  s = q.shape[1]
  logits = np.where(np.tril(np.ones((s, s), bool)), np.einsum("bqhd,bkhd->bhqk", q, k), -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p_v = np.asarray(jnp.asarray(p, jnp.float32).astype(jnp.bfloat16).astype(jnp.float32)) \
      if round_p else p
  return np.einsum("bhqk,bkhd->bqhd", p_v, v) / np.moveaxis(p.sum(-1), 1, 2)[..., None]


def _distance_bias(pos, slopes, table):
  """-slopes_h |i - j| + table_h[clamp(i - j, 0, T - 1)] at positions pos [b, s] ->
  [b, h, s, s]: the kernel's bias, materialised."""
  dist = (pos[:, :, None] - pos[:, None, :])[:, None]
  return -slopes[:, None, None] * jnp.abs(dist) + table[
      jnp.arange(table.shape[0])[:, None, None], jnp.clip(dist, 0, table.shape[1] - 1)]


def _qkv(shape, seed=0):
  q, k, v, g = (jax.random.normal(key, shape, jnp.float32) for key in
                jax.random.split(jax.random.key(seed), 4))
  return q * 2.0, k, v, g  # logits of a few units, like a trained model's


# 520 = 4 query blocks of 128 + 8 rows, 2 key blocks of 256 + 8 keys: every partial block
@pytest.mark.parametrize("shape", [(2, 24, 3, 16), (1, 8, 1, 8), (2, 64, 2, 32), (1, 520, 2, 16)])
def test_kernel_equals_xla_attention_value_and_grads(shape):
  q, k, v, g = _qkv(shape)
  out, vjp = jax.vjp(cpu_attention.causal_attention, q, k, v)
  ref, ref_vjp = jax.vjp(_xla, q, k, v)
  assert _rel(out, _float64_attention(q, k, v)) < 3e-6  # measured <= 1.7e-6 (s = 520)
  assert _rel(out, ref) < VS_XLA
  for got, want in zip(vjp(g), ref_vjp(g)):
    assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("shape", [(2, 24, 3, 16), (1, 8, 1, 8), (1, 200, 2, 64)])
def test_bf16_kernel_is_bf16_products_with_float32_softmax(shape):
  """The bf16 forward = the bf16 products accumulated in float32 with P rounded to bf16 (the
  same algorithm in float64 to ~1e-6; a float32 P, i.e. a kernel that skipped the rounding, is
  ~1e-3 away), causal, float32 out; its gradient = the float32 kernel's at the bf16 values."""
  q, k, v, g = (t.astype(jnp.bfloat16) for t in _qkv(shape, seed=5))
  out = cpu_attention.causal_attention(q, k, v)
  assert out.dtype == jnp.float32
  want = _float64_attention(q, k, v, round_p=True)
  assert _rel(out, want) < 2e-6
  exact = _float64_attention(q, k, v)
  if shape[1] > 8:
    assert _rel(want, exact) > 5e-5  # the rounding of P is visible: the test can tell
  assert _rel(out, exact) < 1e-2
  later = k.at[:, shape[1] // 2:].set(3.0)  # keys after t change nothing at t
  out2 = cpu_attention.causal_attention(q, later, v)
  np.testing.assert_array_equal(out[:, :shape[1] // 2], out2[:, :shape[1] // 2])
  grads = jax.vjp(cpu_attention.causal_attention, q, k, v)[1](g.astype(jnp.float32))
  f32 = jax.vjp(cpu_attention.causal_attention,
                *(t.astype(jnp.float32) for t in (q, k, v)))[1](g.astype(jnp.float32))
  for got, want in zip(grads, f32):
    assert got.dtype == jnp.bfloat16 and _rel(got, want) < 2e-2


@pytest.mark.parametrize("bias", [False, True])
def test_bf16_kernel_across_blocks_equals_xla_bf16_attention(bias):
  """520 tokens (partial query and key blocks, a running max that moves): the bf16 forward
  against XLA's bf16 attention (logits from bf16 q.k, P cast to bf16 for P V) with the same
  distance bias, within bf16's rounding; the statistics equal the float32 kernel's."""
  b, s, h, d = 1, 520, 2, 32
  q, k, v, _ = (t.astype(jnp.bfloat16) for t in _qkv((b, s, h, d), seed=6))
  pos = _positions(b, s, 7)
  kernel_bias = (jnp.linspace(0.01, 0.1, h), jnp.linspace(-1.0, 1.0, 5 * h).reshape(h, 5)) \
      if bias else None
  operands = kernel_bias and (pos, pos, *kernel_bias)
  out = cpu_attention.causal_attention(q, k, v, operands)
  logits = qk_dot(q, k) + (_distance_bias(pos, *kernel_bias) if bias else 0.0)
  xla = softmax_pv(logits, v, 0, jnp.bfloat16)
  assert _rel(out, xla) < 1e-2
  f32 = (t.astype(jnp.float32) for t in (q, k, v))
  assert _rel(out, cpu_attention.causal_attention(*f32, operands)) < 1e-2
  _, stats = cpu_attention.attention_with_stats(q, k, v, pos, pos, kernel_bias, 1)
  _, stats32 = cpu_attention.attention_with_stats(*(t.astype(jnp.float32) for t in (q, k, v)),
                                                  pos, pos, kernel_bias, 1)
  for name in ("entropy", "distance"):
    assert _rel(stats[name], stats32[name]) < 1e-5  # the softmax runs in float32 either way


@pytest.mark.skipif(not cpu_attention.amx(), reason="AMX tiles need a CPU with amx_bf16")
def test_amx_tiles_equal_the_vector_tiles(monkeypatch):
  """On an AMX CPU the bf16 forward's products run as 16 x 16 tiles (whole 16-row blocks, 32
  contraction indices a step, the last < 32 keys and rows past the last 16-row block by the
  vector tiles): the same bf16 products accumulated in float32 in another order, so equal
  to the vector tiles' answer (LENX_CPU_AMX=0) to float32 rounding; 520 tokens with a
  distance bias and statistics reach every partial block."""
  b, s, h, d = 1, 520, 2, 64
  q, k, v, _ = (t.astype(jnp.bfloat16) for t in _qkv((b, s, h, d), seed=8))
  pos = _positions(b, s, 9)
  bias = (jnp.linspace(0.01, 0.1, h), jnp.linspace(-1.0, 1.0, 5 * h).reshape(h, 5))
  tiles = cpu_attention.attention_with_stats(q, k, v, pos, pos, bias, 1)
  monkeypatch.setenv("LENX_CPU_AMX", "0")
  assert not cpu_attention.amx()
  vector = cpu_attention.attention_with_stats(q, k, v, pos, pos, bias, 1)
  # another order: S differs in its last bits, which can flip P's rounding to bf16; each
  # path is within 2e-6 of the float64 algorithm (above), measured 1.5e-6 apart
  assert 0.0 < _rel(tiles[0], vector[0]) < 4e-6
  for name in ("entropy", "distance"):
    assert _rel(tiles[1][name], vector[1][name]) < 1e-5


def test_forward_only_is_fast_alone_and_the_reference_under_a_gradient():
  from models.attention import forward_only
  fn = forward_only(lambda x, n: 2.0 * x, lambda x, n: x ** 2)  # n: an integer argument
  x, n = jnp.float32(3.0), jnp.int32(4)
  assert float(fn(x, n)) == 6.0 and float(jax.jit(fn)(x, n)) == 6.0
  value, grad = jax.value_and_grad(fn)(x, n)
  assert float(value) == 9.0 and float(grad) == 6.0


@pytest.mark.parametrize("posenc", ["rope", "alibi", "t5_bias", "kerple_log", "kerple_power",
                                    "sandwich"])
def test_bf16_model_evaluates_with_the_kernel_and_trains_as_xla(monkeypatch, posenc):
  """A bf16 model: its forward with the bf16 kernel is XLA's bf16 forward to bf16 rounding,
  and its loss and gradient under jax.grad are XLA's (forward_only), whatever the choice;
  also for the encodings whose kernel bias is trainable (T5's table, KERPLE's r1 / r2),
  which the custom VJP must take as arguments (they leaked as tracers before)."""
  results = {}
  for choice in ("xla", "kernel"):
    monkeypatch.setenv("LENX_CPU_ATTENTION", choice)
    loss, params = _model_loss(posenc, False, "bfloat16")
    results[choice] = jax.jit(loss)(params), jax.jit(jax.value_and_grad(loss))(params)
  (fwd_x, (loss_x, g_x)), (fwd_k, (loss_k, g_k)) = results["xla"], results["kernel"]
  assert _rel(fwd_k, fwd_x) < 2e-2 and float(fwd_k) != float(fwd_x)  # another computation
  assert _rel(loss_k, loss_x) < 1e-6
  flat_k, flat_x = (dict(nnx.traversals.flatten_mapping(g)) for g in (g_k, g_x))
  for key in flat_x:
    assert _rel(flat_k[key], flat_x[key]) < 1e-5, key


def test_kernel_is_causal_and_saves_the_row_log_sum_exp():
  q, k, v, _ = _qkv((1, 16, 2, 8))
  out = cpu_attention.causal_attention(q, k, v)
  later = k.at[:, 9:].set(5.0), v.at[:, 9:].set(-3.0)  # change keys/values after t = 8
  out2 = cpu_attention.causal_attention(q, *later)
  np.testing.assert_array_equal(out[:, :9], out2[:, :9])
  assert float(jnp.max(jnp.abs(out[:, 9:] - out2[:, 9:]))) > 1e-2
  none = jnp.zeros((2, 1))
  pos = jnp.zeros((1, 1), jnp.int32)
  lse = cpu_attention._forward(q, k, v, pos, pos, none[:, 0], none, 0)[1][4]  # LSE [b, h, s]
  logits = jnp.where(jnp.tril(jnp.ones((16, 16), bool)), qk_dot(q, k), -jnp.inf)
  np.testing.assert_allclose(lse, jax.nn.logsumexp(logits, axis=-1), rtol=1e-6, atol=1e-6)


def test_kernel_softmax_is_exact_across_the_exponential_range():
  """P = exp(S - max) over logits spread from 0 to -120 below each row's max (the kernel's
  own exp: a rounded multiple of ln 2 plus a polynomial, 0 below -87; rows padded to whole
  8- or 16-lane vectors): the output and the row LSE within float32 rounding of float64's."""
  s, d = 264, 16  # 264 = a key block of 256 + 8: rows whose visible keys end mid-vector
  spread = np.linspace(0.0, -120.0, s)
  q = np.zeros((1, s, 1, d), np.float32)
  q[..., 0] = 1.0
  k = np.zeros((1, s, 1, d), np.float32)
  k[0, :, 0, 0] = np.random.default_rng(5).permutation(spread)  # logit of pair (i, j) = k_j
  v = np.random.default_rng(6).normal(size=(1, s, 1, d)).astype(np.float32)
  out = cpu_attention.causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  want = _float64_attention(q, k, v)
  # 7.3e-8 with the AVX-512 and the AVX2 build; 2.4e-7 with one polynomial coefficient off
  # by 4e-4 relative (an exp wrong by ~3e-6): the bound tells the two apart
  assert _rel(out, want) < 1.5e-7
  none, pos = jnp.zeros((1, 1)), jnp.zeros((1, 1), jnp.int32)
  lse = cpu_attention._forward(*(jnp.asarray(t) for t in (q, k, v)), pos, pos, none[:, 0],
                               none, 0)[1][4][0, 0]
  logits = np.where(np.tril(np.ones((s, s), bool)), k[0, :, 0, 0][None, :].astype(np.float64),
                    -np.inf)
  np.testing.assert_allclose(lse, np.log(np.exp(logits).sum(-1)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("posenc, applies", [("rope", True), ("nope", True), ("learned", True),
                                             ("alibi", True), ("t5_bias", True),
                                             ("kerple_log", True), ("kerple_power", True),
                                             ("sandwich", True), ("fire", False)])
def test_model_uses_kernel_only_for_plain_logits_and_matches_xla(monkeypatch, posenc, applies):
  results = {}
  for choice in ("xla", "kernel"):
    monkeypatch.setenv("LENX_CPU_ATTENTION", choice)
    loss, params = _model_loss(posenc, False)
    traced = str(jax.make_jaxpr(jax.grad(loss))(params))
    results[choice] = jax.value_and_grad(loss)(params), "lenx_causal_attention" in traced
  (loss_x, g_x), used_x = results["xla"]
  (loss_k, g_k), used_k = results["kernel"]
  assert not used_x and used_k == applies
  assert _rel(loss_k, loss_x) < 1e-6
  flat_k, flat_x = (dict(nnx.traversals.flatten_mapping(g)) for g in (g_k, g_x))
  for key in flat_x:
    assert _rel(flat_k[key], flat_x[key]) < 1e-5, key


def _positions(b, s, seed):
  """Sorted positions with gaps and an offset (randomized / PoSE-style ids), [b, s]."""
  gaps = jax.random.randint(jax.random.key(seed), (b, s), 1, 40)
  return 100 + jnp.cumsum(gaps, axis=1) - gaps[:, :1]


@pytest.mark.parametrize("parts", ["slopes", "table", "both"])
@pytest.mark.parametrize("shape", [(2, 24, 3, 16), (1, 520, 2, 16)])
def test_kernel_distance_bias_equals_the_bias_added_to_xla_logits(shape, parts):
  """The kernel's bias (-slope |i - j| + table[clamp(i - j, 0, T - 1)] at the positions)
  against the same bias materialised and added to q.k, for values and for the gradients of
  q, k, v, the slopes and the table; positions with gaps reach past the table's end."""
  b, s, h, _ = shape
  q, k, v, g = _qkv(shape)
  pos = _positions(b, s, 1)
  kt, ks = jax.random.split(jax.random.key(2))
  slopes = jax.random.uniform(ks, (h,), minval=0.01, maxval=0.5) if parts != "table" else None
  table = jax.random.normal(kt, (h, 37)) if parts != "slopes" else None

  def xla(q, k, v, slopes, table):
    dist = pos[:, :, None] - pos[:, None, :]  # [b, sq, sk], i - j
    bias = jnp.zeros((b, h, s, s))
    if slopes is not None:
      bias -= slopes[None, :, None, None] * jnp.abs(dist)[:, None].astype(jnp.float32)
    if table is not None:
      bias += jnp.moveaxis(table.T[jnp.clip(dist, 0, table.shape[1] - 1)], -1, 1)
    return softmax_pv(qk_dot(q, k) + bias, v, 0, jnp.float32)

  def kernel(q, k, v, slopes, table):
    return cpu_attention.causal_attention(q, k, v, (pos, pos, slopes, table))

  out, vjp = jax.vjp(kernel, q, k, v, slopes, table)
  ref, ref_vjp = jax.vjp(xla, q, k, v, slopes, table)
  assert _rel(out, ref) < VS_XLA
  for got, want in zip(vjp(g), ref_vjp(g)):
    if want is not None:
      assert _rel(got, want) < 1e-5
  assert _rel(out, cpu_attention.causal_attention(q, k, v)) > 1e-2  # the bias matters


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape, rows", [((3, 24, 3, 16), 2), ((1, 520, 2, 16), 1)])
def test_kernel_statistics_equal_their_definition_on_the_first_rows(shape, rows, bias):
  """attention_with_stats: the output of causal_attention, plus the mean entropy and
  attended distance |i - j| (positions with gaps) over the first ``rows`` batch rows,
  equal to attention.attention_stats on the materialised probabilities of those rows
  (across query and key blocks, with and without a distance bias)."""
  from models.attention import attention_stats, stats_rows
  b, s, h, _ = shape
  q, k, v, _ = _qkv(shape, seed=3)
  pos = _positions(b, s, 4)
  slopes, table = (jnp.linspace(0.05, 0.4, h), jnp.linspace(-1.0, 1.0, 5 * h).reshape(h, 5))
  kernel_bias = (slopes, table) if bias else None
  out, stats = cpu_attention.attention_with_stats(q, k, v, pos, pos, kernel_bias, rows)
  np.testing.assert_array_equal(
      out, cpu_attention.causal_attention(q, k, v, kernel_bias and (pos, pos, *kernel_bias)))
  logits = qk_dot(q, k)[:rows] + (_distance_bias(pos[:rows], slopes, table) if bias else 0.0)
  probs = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((s, s), bool)), logits, -jnp.inf), -1)
  want = attention_stats(probs, pos[:rows], pos[:rows])
  assert _rel(stats["entropy"], want["entropy"]) < 1e-5
  assert _rel(stats["distance"], want["distance"]) < 1e-5
  assert stats_rows(True, b) == b and stats_rows(rows, b) == rows and stats_rows(9, 2) == 2
  grad = lambda f: jax.grad(lambda q: jnp.sum(f(q) ** 2))(q)  # the output's gradient is kept
  np.testing.assert_allclose(
      grad(lambda q: cpu_attention.attention_with_stats(q, k, v, pos, pos, kernel_bias, rows)[0]),
      grad(lambda q: cpu_attention.causal_attention(q, k, v, kernel_bias and (pos, pos, *kernel_bias))),
      rtol=1e-6, atol=1e-6)


def test_t5_distance_table_is_exact_past_max_distance():
  """T5's kernel table stops at the first distance in the last bucket; every longer
  distance (to 4 x max_distance) has the same bias as the table's last entry."""
  from tests.conftest import make_tiny_config
  from configs.common import resolve
  from models import build_model
  c = make_tiny_config(posenc="t5_bias", train_len=24)
  enc = build_model(resolve(c)).posenc
  slopes, table = enc.distance_bias()
  n = 4 * c.posenc.t5_bias.max_distance
  full = enc.bias(jnp.arange(n)[None], jnp.zeros((1, 1), jnp.int32))[0, :, :, 0]  # [h, n]
  assert slopes is None and table.shape[1] < n
  np.testing.assert_array_equal(table[:, jnp.clip(jnp.arange(n), 0, table.shape[1] - 1)], full)
  assert enc.kernel_bias() is not None
  c.posenc.t5_bias.bidirectional = True
  assert build_model(resolve(c)).posenc.distance_bias() is None
  own_scores = type("OwnScores", (type(enc),), {"scores": lambda self, q, k, qp, kp: None})
  enc.__class__ = own_scores  # a subclass with its own rule for the logits keeps XLA's path
  assert enc.distance_bias() is not None and enc.kernel_bias() is None


@pytest.mark.parametrize("posenc", ["kerple_log", "kerple_power", "sandwich"])
def test_bounded_distance_tables_hold_inside_the_window_and_fall_back_beyond(monkeypatch, posenc):
  """KERPLE's and Sandwich's biases have no finite exact table: the kernel gets one over the
  distances 0..s - 1 (equal to ``bias`` there), taken only while the positions span less than
  s. With gapped ids (randomized / PoSE-style) or decreasing ones attention takes XLA's path,
  where the clamped table would be wrong (checked: the guard is needed), in float32 and bf16."""
  from tests.conftest import make_tiny_config
  from configs.common import resolve
  from models import attention, build_model
  monkeypatch.setenv("LENX_CPU_ATTENTION", "kernel")
  s = 24
  enc = build_model(resolve(make_tiny_config(posenc=posenc, train_len=s))).posenc
  slopes, table = enc.kernel_bias(max_distance=s - 1)
  assert slopes is None and enc.kernel_bias() is None
  np.testing.assert_allclose(
      table, enc.bias(jnp.arange(s)[None], jnp.zeros((1, 1), jnp.int32))[0, :, :, 0], atol=1e-6)
  q, k, v = (jax.random.normal(jax.random.key(i), (2, s, enc.num_heads, 8)) for i in range(3))
  xla = lambda q, k, v, pos, stats=False: attention._xla_attend(
      q, k, v, pos, pos, enc, with_stats=stats, impl="full", block_size=512)
  contiguous = jnp.broadcast_to(jnp.arange(s), (2, s))
  for pos in (contiguous, contiguous[:, ::-1], _positions(2, s, 0)):  # decreasing: i - j < 0
    ref = xla(q, k, v, pos)[0]
    assert _rel(attention.attend(q, k, v, pos, pos, enc)[0], ref) < VS_XLA
    stats = attention.attend(q, k, v, pos, pos, enc, with_stats=1)[1]  # an evaluation row's
    ref_stats = xla(q, k, v, pos, 1)[1]
    for key in ref_stats:
      assert _rel(stats[key], ref_stats[key]) < 1e-5, key
    low = [t.astype(jnp.bfloat16) for t in (q, k, v)]
    assert _rel(attention.attend(*low, pos, pos, enc)[0], xla(*low, pos)[0]) < 1e-2
  clamped = cpu_attention.causal_attention(q, k, v, (pos, pos, None, table))
  assert _rel(clamped, ref) > 1e-3  # the gapped ids reach past the table


def test_rope_with_a_piecewise_extension_is_not_plain():
  from tests.conftest import make_tiny_config
  from configs.common import resolve
  from models import build_model
  c = make_tiny_config(posenc="rope", train_len=24)
  enc = build_model(resolve(c)).posenc
  assert enc.content_only
  enc.scores_rule = '{"name": "self_extend"}'  # any rule makes RoPE's scores its own
  assert not enc.content_only


def test_shapes_and_choices_that_keep_xla(monkeypatch):
  monkeypatch.setenv("LENX_CPU_ATTENTION", "kernel")
  enc = type("Plain", (), {"content_only": True, "kernel_bias": lambda self, **_: None})()
  q = jnp.zeros((1, 24, 2, 8))
  assert cpu_attention.use_kernel(q, q, enc)
  assert not cpu_attention.use_kernel(jnp.zeros((1, 20, 2, 8)), jnp.zeros((1, 20, 2, 8)), enc)
  assert not cpu_attention.use_kernel(q, jnp.zeros((1, 32, 2, 8)), enc)  # cached keys
  assert cpu_attention.use_kernel(jax.ShapeDtypeStruct(q.shape, q.dtype), q, enc)  # a shape will do
  assert cpu_attention.use_kernel(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), enc)
  assert not cpu_attention.use_kernel(q.astype(jnp.bfloat16), q, enc)  # mixed dtypes
  assert not cpu_attention.use_kernel(q.astype(jnp.float16), q.astype(jnp.float16), enc)
  monkeypatch.setenv("LENX_CPU_ATTENTION", "auto")
  assert cpu_attention.enabled()[0] == cpu_attention._available()  # on every CPU class
  assert not cpu_attention.enabled(backend="gpu")[0]
  monkeypatch.setenv("LENX_CPU_ATTENTION", "xla")
  assert not cpu_attention.use_kernel(q, q, enc)
  monkeypatch.setenv("LENX_CPU_ATTENTION", "fast")
  with pytest.raises(ValueError, match="LENX_CPU_ATTENTION='fast'; valid choices: auto, kernel, xla"):
    cpu_attention.enabled()


def test_build_failure_is_a_clear_error(monkeypatch, tmp_path):
  monkeypatch.setenv("CXX", "/bin/false")
  with pytest.raises(RuntimeError, match="building the CPU attention kernel failed"):
    cpu_attention._build(str(tmp_path / "lib.so"))
  assert list(tmp_path.iterdir()) == []  # no half-written library left behind
