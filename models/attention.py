"""Causal multi-head attention that talks to positional encodings only through
the hooks of ``posenc.base.PositionalEncoding``.

``full_attend`` computes softmax(scores + causal mask) V for a whole sequence at
once; ``models.blockwise`` does the same by blocks without an L x L matrix;
``attend`` picks one (config.model.attention = auto | full | blockwise).
Masking is by *index* (key index <= query index), never by position id, so offset
and randomized positions (sorted, possibly with gaps) are handled uniformly.
"""
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from models import cpu_attention
from models.blockwise import blockwise_attend, blockwise_stats
from models.fast_attention import NEG_INF, causal_softmax, softmax_pv
from models.layers import Dense, compute_dtype
from posenc.base import PositionalEncoding, grouped_qk

def logn_query_scale(positions, base_len):
  """Chiang & Cholak 2022 / Su 2023 log-n scaling: max(1, log(pos+1) / log(base_len)).

  Identity up to the training length, grows slowly beyond it so attention
  entropy stays roughly constant as the number of keys grows. [b, s] -> [b, s].
  """
  pos = positions.astype(jnp.float32)
  return jnp.maximum(1.0, jnp.log(pos + 1.0) / math.log(base_len))


def attention_stats(probs, q_pos, k_pos):
  """Mean attention entropy (nats) and mean attended distance |i - j| of probs [b,h,sq,sk]."""
  entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1)
  distance = jnp.abs(q_pos[:, None, :, None] - k_pos[:, None, None, :]).astype(jnp.float32)
  mean_distance = jnp.sum(probs * distance, axis=-1)
  return {"entropy": jnp.mean(entropy), "distance": jnp.mean(mean_distance)}


ATTENTION_IMPLS = ("auto", "full", "blockwise")


def use_blockwise(impl, seq_len, block_size, enc):
  """Whether ``attend`` takes the blockwise path (attention statistics too, accumulated
  online). "auto" = blockwise beyond 2 blocks (below that one tile is the whole matrix and
  full attention is faster; statistics at 1024 tokens, block 512, compiled twice as long
  blockwise for a 0.08 s gain). Encodings with ``blockwise = False`` (scores need a whole
  row, e.g. CoPE) always take the full path."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention {impl!r}; valid choices: {', '.join(ATTENTION_IMPLS)}")
  wanted = impl == "blockwise" or (impl == "auto" and seq_len > 2 * block_size)
  return wanted and enc.blockwise


def stats_rows(with_stats, batch):
  """How many leading batch rows ``with_stats`` asks statistics of: False / 0 none, True
  all, n the first n."""
  return batch if with_stats is True else min(int(with_stats), batch)


def attend(q, k, v, q_pos, k_pos, enc, *, with_stats=False, impl="full", block_size=512):
  """Causal attention: the fused CPU kernel where it applies (``cpu_attention.use_kernel``;
  without statistics, a length off its tile multiple is padded, ``_pad_sequence``), else
  full or blockwise (see ``use_blockwise``); same result every way. with_stats: also the
  mean attention entropy and distance (``attention_stats``) over all rows (True) or the
  first n rows (an int); the kernel computes them in the same pass.

  bfloat16 runs the kernel only where nothing differentiates it (evaluation, prefill):
  under a gradient, XLA's bf16 attention, as before the bf16 kernel existed, so bf16
  training keeps its measured speed and numbers (``forward_only``). Piecewise RoPE logits
  (``enc.has_kernel_pieces``) likewise, in both dtypes: the kernel has no backward for them."""
  rows = stats_rows(with_stats, q.shape[0])
  kw = dict(with_stats=with_stats, impl=impl, block_size=block_size)
  pad = -q.shape[1] % cpu_attention.SEQ_MULTIPLE
  if pad and not rows and cpu_attention.use_kernel(  # which also asks q.shape == k.shape
      *[jax.ShapeDtypeStruct(_padded_shape(x, pad), x.dtype) for x in (q, k)], enc):
    out, _ = attend(*_pad_sequence((q, k, v), (q_pos, k_pos), pad), enc, impl=impl,
                    block_size=block_size)
    return out[:, :q.shape[1]], None
  if cpu_attention.use_kernel(q, k, enc):
    kernel = functools.partial(_kernel_attend, enc=enc, rows=rows)
    xla = lambda *args: _xla_attend(*args, enc, **kw)
    if enc.has_kernel_pieces:  # forward only: no backward of piecewise logits in the kernel
      return forward_only(kernel, xla)(q, k, v, q_pos, k_pos)
    if not (enc.content_only or enc.kernel_bias() is not None):  # a table to s - 1 only
      kernel = within_span(kernel, xla, q.shape[1] - 1)
    if q.dtype == jnp.bfloat16:
      return forward_only(kernel, xla)(q, k, v, q_pos, k_pos)
    return kernel(q, k, v, q_pos, k_pos)
  return _xla_attend(q, k, v, q_pos, k_pos, enc, **kw)


def _padded_shape(x, pad):
  return (x.shape[0], x.shape[1] + pad, *x.shape[2:])


def _pad_sequence(arrays, positions, pad):
  """q, k, v and q_pos, k_pos with ``pad`` more tokens at the end (zeros, at the positions
  after each row's last): keys after every real query, which causal masking by index keeps
  out of the real rows, so those rows are unchanged (a 16k needle prompt of SmolLM2 had
  taken XLA's path, ~1.7x the kernel's time under Self-Extend)."""
  padded = [jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in arrays]
  after = lambda p: jnp.concatenate([p, p[:, -1:] + jnp.arange(1, pad + 1, dtype=p.dtype)], 1)
  return (*padded, *map(after, positions))


def within_span(fast, fallback, max_distance):
  """A function computing ``fast`` where every causal pair (key index <= query index) has
  0 <= i - j <= ``max_distance`` for query position i and key position j (the reach of a
  bounded distance table: always so for one window of contiguous ids), else ``fallback``
  (randomized or PoSE ids spanning more, or positions that decrease); chosen at run time,
  both compiled. Sufficient: keys' positions non-decreasing, each query at or after the key
  of its own index, and the largest query - smallest key position within the bound."""
  def fn(q, k, v, q_pos, k_pos):
    fits = ((jnp.max(q_pos) - jnp.min(k_pos) <= max_distance)
            & jnp.all(k_pos[:, 1:] >= k_pos[:, :-1]) & jnp.all(q_pos >= k_pos))
    return jax.lax.cond(fits, fast, fallback, q, k, v, q_pos, k_pos)
  return fn


def forward_only(fast, reference):
  """A function computing ``fast(*args)`` where nothing differentiates it; under a gradient
  (its forward rule) ``reference``'s value and gradient instead: a forward-only fast path
  that leaves training exactly as ``reference`` computes it. What either function closes
  over (an encoding's trainable bias, a tracer under the gradient) becomes an explicit
  argument of the custom VJP (``jax.closure_convert``): a custom VJP closing over a tracer
  leaks it (T5 and KERPLE bf16 training failed so, UnexpectedTracerError)."""
  def fn(*args):
    fast_fn, fast_consts = jax.closure_convert(fast, *args)
    ref_fn, ref_consts = jax.closure_convert(reference, *args)

    @jax.custom_vjp
    def run(args, fast_consts, ref_consts):
      return fast_fn(*args, *fast_consts)

    def run_fwd(args, fast_consts, ref_consts):
      out, vjp = jax.vjp(lambda a, c: ref_fn(*a, *c), args, ref_consts)
      return out, (vjp, fast_consts)

    def run_bwd(res, g):
      vjp, fast_consts = res
      d_args, d_ref = vjp(g)
      return d_args, jax.tree.map(jnp.zeros_like, fast_consts), d_ref

    run.defvjp(run_fwd, run_bwd)
    return run(args, fast_consts, ref_consts)
  return fn


def _kernel_attend(q, k, v, q_pos, k_pos, enc, rows):
  if enc.has_kernel_pieces:
    queries, keys, pieces = enc.kernel_pieces(q, k, q_pos, k_pos)
    return cpu_attention.piecewise_attention(queries, keys, v, q_pos, k_pos, pieces, rows)
  bias = enc.kernel_bias(max_distance=q.shape[1] - 1)
  if rows:
    return cpu_attention.attention_with_stats(q, k, v, q_pos, k_pos, bias, rows)
  return cpu_attention.causal_attention(q, k, v, bias and (q_pos, k_pos, *bias)), None


def _xla_attend(q, k, v, q_pos, k_pos, enc, *, with_stats, impl, block_size):
  """``attend`` by XLA's ops: full or blockwise, statistics apart for the first rows."""
  rows = stats_rows(with_stats, q.shape[0])
  if 0 < rows < q.shape[0]:  # the statistics of the first rows apart
    kw = dict(impl=impl, block_size=block_size)
    out, _ = _xla_attend(q, k, v, q_pos, k_pos, enc, with_stats=False, **kw)
    first = lambda x: x[:rows] if x.shape[0] > 1 else x
    return out, _xla_attend(*map(first, (q, k, v, q_pos, k_pos)), enc, with_stats=True, **kw)[1]
  if q.shape[1] == k.shape[1] and use_blockwise(impl, q.shape[1], block_size, enc):
    if with_stats:  # O(block) memory; 4096 tokens: 0.25 s instead of 1.7 (demo model, EPYC)
      return blockwise_stats(q, k, v, q_pos, k_pos, enc, block_size)
    return blockwise_attend(q, k, v, q_pos, k_pos, enc, block_size), None
  return full_attend(q, k, v, q_pos, k_pos, enc, with_stats=with_stats)


def full_attend(q, k, v, q_pos, k_pos, enc, *, with_stats=False, key_mask=None,
                causal=True):
  """Full causal attention. q/k/v [b, s, h, d] (q pre-scaled) -> [b, s, h, d] float32.

  Without stats, the softmax and P V run in ``fast_attention.softmax_pv`` (custom
  VJP); with stats, the plain formulation (probabilities are needed). ``key_mask``
  [b or 1, sq, sk] (bool, optional) removes keys as well (a KV cache's empty slots and a
  decoded chunk's later tokens: ``models.generate``); ``causal=False`` leaves the causal
  mask to it (query rows that are not in sequence order).
  """
  logits = enc.scores(q, k, q_pos, k_pos)
  if key_mask is not None:
    logits = jnp.where(key_mask[:, None], logits, NEG_INF)
  offset = k.shape[1] - q.shape[1] if causal else k.shape[1]
  if not with_stats:
    return softmax_pv(logits, v, offset, v.dtype), None
  probs = causal_softmax(logits, offset)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return (out, attention_stats(probs, q_pos, k_pos)) if with_stats else (out, None)


def plain_scores(enc):
  """Whether ``enc``'s logits are q.k plus its ``bias`` (no rule of its own)."""
  return enc.content_only or type(enc).scores is PositionalEncoding.scores


def grouped_attend(q, k, v, q_pos, k_pos, enc, key_mask):
  """Attention of queries q [b, s, h, d] (prepared, q pre-scaled) over a KV cache in its
  own layout, k / v [b * kv, t, d] (batch and kv heads merged, each head's keys contiguous),
  where query head j reads kv head j // (h / kv). No copy of the cache: not of each kv head
  h / kv times (``prepare``'s sharing), not a transpose, not a copy before the cache's
  in-place update, all of which a few queries over a long cache pay in full (SmolLM2
  decoding at 4k: benchmarks/README.md, "Decoding"). key_mask [b or 1, s, t]: the keys each
  query reads. For ``plain_scores`` encodings, and for piecewise rules with k the tuple of
  cached key views (``enc.key_views``; q then unrotated). -> [b, s, h, d] float32."""
  b, s, h, d = q.shape
  kv, t = v.shape[0] // b, v.shape[1]
  if isinstance(k, tuple):  # a piecewise rule's key views (``enc.key_views``)
    logits = enc.view_scores(q, k, q_pos, k_pos)
  else:
    logits = grouped_qk(q, k)
    bias = enc.bias(q_pos, k_pos)  # [b or 1, h, s, t]: heads in (kv, group) order, as shared
    if bias is not None:
      logits = logits + bias.reshape(bias.shape[0], kv, h // kv, s, t)
  probs = jax.nn.softmax(jnp.where(key_mask[:, None, None], logits, NEG_INF), axis=-1)
  out = jnp.einsum("nqt,ntd->nqd", probs.reshape(b * kv, -1, t).astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.reshape(b, kv, h // kv, s, d).transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)


class Attention(nnx.Module):
  """Multi-head self-attention with a fused QKV projection; grouped-query attention
  (Ainslie et al. 2023, GQA) when ``num_kv_heads`` < ``num_heads``: the projection's
  columns are [q (h heads) | k (kv heads) | v (kv heads)], and query head j reads
  key/value head j // (h / kv) (Hugging Face ``repeat_kv``)."""

  def __init__(self, cfg, *, rngs):
    self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
    self.num_kv_heads = cfg.num_kv_heads or cfg.num_heads
    inner = cfg.num_heads * cfg.head_dim
    self.qkv = Dense(cfg.d_model, inner + 2 * self.num_kv_heads * cfg.head_dim, dtype=cfg.dtype,
                     rngs=rngs)
    self.out = Dense(inner, cfg.d_model, std=0.02 / math.sqrt(2 * cfg.num_layers),
                     dtype=cfg.dtype, rngs=rngs)
    self.dtype = compute_dtype(cfg.dtype)
    self.logn_base_len = cfg.logn_base_len
    self.impl, self.block_size = cfg.attention, cfg.block_size

  def project(self, x):
    """q [b, s, h, d] and k, v [b, s, kv, d] of x [b, s, d], before any positional hook
    (``models.generate`` caches keys rotated or not, depending on the encoding)."""
    b, s, _ = x.shape
    h, kv = self.num_heads, self.num_kv_heads
    return jnp.split(self.qkv(x).reshape(b, s, h + 2 * kv, self.head_dim), [h, h + kv], axis=2)

  def prepare(self, q, k, v, q_pos, k_pos, enc, share_kv=True, rotate=True):
    """Rotates q/k at their positions (unless ``rotate`` is False: done already, e.g. keys
    cached rotated), shares kv heads (unless ``share_kv`` is False: k / v keep their kv
    heads, for ``grouped_attend``), scales q; cast to the compute dtype."""
    h, kv = self.num_heads, self.num_kv_heads
    if rotate:
      q, k = enc.rotate(q, k, q_pos, k_pos)
    if kv != h and share_kv:  # rotate the kv heads first (fewer), then share each among h / kv
      k, v = (jnp.repeat(t, h // kv, axis=2) for t in (k, v))
    return (self.scale_queries(q, q_pos),) + tuple(t.astype(self.dtype) for t in (k, v))

  def scale_queries(self, q, q_pos):
    """q / sqrt(head_dim), times the log-n scale where set, in the compute dtype."""
    q = q * (1.0 / math.sqrt(self.head_dim))
    if self.logn_base_len:
      q = q * logn_query_scale(q_pos, self.logn_base_len)[:, :, None, None]
    return q.astype(self.dtype)

  def probabilities(self, x, positions, enc):
    """Attention probabilities [b, h, s, s] (float32) of x's tokens over themselves: the
    logits every attention path forms, softmaxed (analysis: ``evaluation.heads``)."""
    q, k, _ = self.prepare(*self.project(x), positions, positions, enc)
    return causal_softmax(enc.scores(q, k, positions, positions), 0).astype(jnp.float32)

  def uses_kernel(self, seq_len, enc):
    """Whether self-attention over ``seq_len`` tokens runs the fused CPU kernel (whose
    attention statistics come at no extra pass: ``attend``)."""
    x = jax.ShapeDtypeStruct((1, seq_len, self.num_heads, self.head_dim), self.dtype)
    return cpu_attention.use_kernel(x, x, enc)

  def __call__(self, x, positions, enc, *, with_stats=False):
    b, s, _ = x.shape
    q, k, v = self.prepare(*self.project(x), positions, positions, enc)
    out, stats = attend(q, k, v, positions, positions, enc, with_stats=with_stats,
                        impl=self.impl, block_size=self.block_size)
    return self.out(out.reshape(b, s, -1)), stats
