"""Blockwise (flash-style) causal attention in pure JAX: never an L x L matrix.

Follows the online softmax of Milakov & Gimelshein 2018 ("Online normalizer
calculation for softmax", Alg. 3) as used by FlashAttention (Dao et al. 2022,
Alg. 1) and Rabe & Staats 2021 ("Self-attention does not need O(n^2) memory").
For query block i and key blocks j = 0..i, with logits S_ij from the encoding's
``scores`` hook (so every bias is evaluated on its block only):

  m' = max(m, rowmax(S_ij)),   P = exp(S_ij - m')
  l' = l e^(m - m') + rowsum(P),   acc' = acc e^(m - m') + P V_j,   out_i = acc / l

Running max, sum and accumulator are float32. Key blocks j > i (entirely above
the causal diagonal) are skipped by a ``lax.switch`` inside the scan, so they are
neither computed nor masked; the mask (by *index*, like ``attention.attend``) is
applied to the diagonal tiles only (the others are entirely visible). Lengths that
are not multiples of the block are padded at the end: a padded key has an index
larger than every real query, so the causal mask removes it, and padded query rows
are sliced off.

Memory: one [b, h, block, block] logit tile at a time. Under ``jax.grad`` the
key-block body is rematerialised (``jax.checkpoint``), so the backward pass
stores only the (m, l, acc) carries, O(L^2 / block) not O(L^2); a hand-written
flash backward would store less still (left out: training at our lengths uses
the full path).

Encodings with ``blockwise = False`` (scores need a whole row, e.g. CoPE) cannot
use this; ``attention.attend`` sends them to the full path.
"""
import jax
import jax.numpy as jnp

from models.fast_attention import NEG_INF
from posenc.xla_ops import row_major


def _blocks(x, n, block):
  """[b, s, ...] -> [n, b, block, ...], padding the sequence at the end (edge values)."""
  pad = n * block - x.shape[1]
  widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
  x = jnp.pad(x, widths, mode="edge") if pad else x
  return x.reshape(x.shape[0], n, block, *x.shape[2:]).swapaxes(0, 1)


def blockwise_attend(q, k, v, q_pos, k_pos, enc, block_size=512):
  """Causal self-attention by blocks. q/k/v [b, s, h, d] (q pre-scaled, already rotated),
  positions [b, s] -> [b, s, h, d] float32; equals ``attention.attend`` to f32 rounding."""
  if q.shape[1] != k.shape[1]:
    raise ValueError(f"blockwise attention needs self-attention (sq == sk), got "
                     f"sq={q.shape[1]}, sk={k.shape[1]}; use attention='full'")
  b, s, h, d = q.shape
  block = min(block_size, s)
  n = -(-s // block)
  qb, kb, vb = (_blocks(t, n, block) for t in (q, k, v))
  qpb, kpb = _blocks(q_pos, n, block), _blocks(k_pos, n, block)
  vb = vb.transpose(0, 1, 3, 2, 4)  # [n, b, h, block, d]: P V_j is then a plain batched matmul
  # K^T stored once per layer, [n, b, h, d, block], as the q.k product reads it; the hook
  # gets a transposed view that XLA folds away, instead of a transposing copy of the key
  # block in every tile (16k evaluation: bf16 -11 %, f32 -5 %, in-process A/B)
  kb = row_major(kb.transpose(0, 1, 3, 4, 2))
  idx = jnp.arange(block)

  def key_step(i, q_blk, qp_blk, carry, j, diagonal):
    m, l, acc = carry
    logits = enc.scores(q_blk, kb[j].transpose(0, 3, 1, 2), qp_blk, kpb[j])  # [b, h, bq, bk] f32
    if diagonal:  # tiles below the diagonal are entirely visible: no mask pass
      logits = jnp.where(idx[None, :] <= idx[:, None], logits, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
    p = jnp.exp(logits - m_new[..., None]).astype(v.dtype)  # one pass writes P as used by P V
    scale = jnp.exp(m - m_new)
    l = l * scale + jnp.sum(p, axis=-1, dtype=jnp.float32)
    pv = jnp.einsum("bhqk,bhkd->bhqd", p, vb[j], preferred_element_type=jnp.float32)
    return m_new, l, acc * scale[..., None] + pv

  def query_block(args):
    i, q_blk, qp_blk = args
    below, diag = (jax.checkpoint(lambda c, j, d=d: key_step(i, q_blk, qp_blk, c, j, d))
                   for d in (False, True))

    def body(carry, j):  # key blocks above the diagonal are skipped: not computed at all
      branch = jnp.where(j < i, 0, jnp.where(j == i, 1, 2))
      return jax.lax.switch(branch, (below, diag, lambda c, _: c), carry, j), None

    init = (jnp.full((b, h, block), NEG_INF, jnp.float32), jnp.zeros((b, h, block), jnp.float32),
            jnp.zeros((b, h, block, d), jnp.float32))
    (_, l, acc), _ = jax.lax.scan(body, init, jnp.arange(n))
    return (acc / l[..., None]).transpose(0, 2, 1, 3)  # [b, bq, h, d]

  out = jax.lax.map(query_block, (jnp.arange(n), qb, qpb))  # [n, b, block, h, d]
  return out.swapaxes(0, 1).reshape(b, n * block, h, d)[:, :s]
