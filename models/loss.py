"""Per-token losses, with the output head applied chunk by chunk along the
sequence so that memory does not grow with vocab x length."""
import jax
import jax.numpy as jnp


def cross_entropy(logits, targets):
  """-log softmax(logits)[target], float32; logits [..., V], targets [...] int."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return logz - picked


def entropy(logits):
  """Entropy (nats) of softmax(logits) over the last axis: logZ - sum_v p_v logit_v."""
  logz = jax.nn.logsumexp(logits, axis=-1)
  return logz - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)


def nll_and_entropy(logits, targets):
  return cross_entropy(logits, targets), entropy(logits)


LOGIT_BLOCK = 1 << 24  # logits (floats) live at a time: 64 MB in float32


def logit_chunk(batch, vocab, most=2048):
  """Positions per head chunk: a power of two with batch x chunk x vocab <= LOGIT_BLOCK
  (bytes: 2048; a 49k-token vocabulary at batch 1: 256, so a 32k window's loss holds 64 MB
  of logits instead of 400 MB per chunk), at least 64."""
  fit = max(1, LOGIT_BLOCK // max(1, batch * vocab))
  return max(64, min(most, 1 << (fit.bit_length() - 1)))


def per_token(model, hidden, targets, fn, chunk=None):
  """fn(logits [b, s', V], targets [b, s']) -> [b, s'] (or a tuple of them) over the whole
  sequence, from final hidden states [b, s, d].

  For s > chunk the head runs on chunks of ``chunk`` positions (default ``logit_chunk``)
  inside a ``lax.map``, so only a [b, chunk, vocab] logit block is live at a time.
  """
  b, s, d = hidden.shape
  if chunk is None:
    vocab = jax.eval_shape(model.logits, hidden[:, :1]).shape[-1]
    chunk = logit_chunk(b, vocab)
  if s <= chunk:
    return fn(model.logits(hidden), targets)
  pad = (-s) % chunk
  h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, chunk, d).swapaxes(0, 1)
  t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, -1, chunk).swapaxes(0, 1)
  out = jax.lax.map(lambda xs: fn(model.logits(xs[0]), xs[1]), (h, t))
  return jax.tree.map(lambda v: v.swapaxes(0, 1).reshape(b, -1)[:, :s], out)


def token_nll(model, hidden, targets, chunk=None):
  """NLL [b, s] of targets given final hidden states [b, s, d] (chunked head)."""
  return per_token(model, hidden, targets, cross_entropy, chunk)


def masked_mean(values, mask):
  """Sum(values * mask) / max(sum(mask), 1)."""
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
