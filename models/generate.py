"""Autoregressive decoding with a key/value cache, for every registered encoding.

``CachedDecoder.feed(tokens)`` runs a chunk (a prompt, then one token at a time) through
the model against the cache and returns the chunk's logits; ``generate`` samples with it.
The first chunk into an empty cache (the prompt) attends over itself by the model's own
attention path (blockwise when long), so a 16k prompt never builds a [16k, capacity] matrix.
The model's own modules do the work: each block's attention is swapped, inside the traced
copy only, for ``_CachedAttention``, which calls ``Attention.project`` / ``prepare`` and
``full_attend`` like the full forward, so every positional hook applies unchanged:

* absolute encodings (``embed``): the new token is embedded at its own position;
* rotary encodings (``rotate``): the cache stores keys *before* rotation, and every step
  rotates all cached keys at their positions. One elementwise pass over the cache, the
  same order of work as the attention read itself, and it is what makes length-dependent
  frequencies exact: dynamic NTK and LongRoPE change every key's rotation as the sequence
  grows, and Hugging Face transformers, which caches rotated keys, keeps the old scale for
  the old keys (issue huggingface/transformers#25104). Here the frequencies of the current
  length are passed to each step, so step n equals a full forward over n tokens;
* bias families (``bias`` / ``scores``): logits from the cached key positions;
* CoPE: its gates sum over a query's whole row of keys, which works because the buffer is
  *right-aligned*: the valid keys occupy the last ``length`` slots, the queries are the last
  of the buffer, and the empty slots (masked) lie before every valid key, so no gate of an
  empty slot enters a count. The causal offset sk - sq of ``full_attend`` is then right too.

Eviction (StreamingLLM, Xiao et al. 2024, arXiv 2309.17453, sec. 3.2): with ``sinks``,
a full cache keeps its first ``sinks`` tokens and drops the oldest of the rest; positions
are then counted inside the cache (``cache_positions``), as in the paper, so no distance
exceeds the cache size. Keys being unrotated, re-rotating at the new cache positions
every step is free.
"""
import copy
import functools
import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models.attention import attend, full_attend, grouped_attend, plain_scores
from models.layers import jit
from training.steps import split_model


def _write(buf, new, sinks):
  """Right-aligned append of new [b, s, ...] to buf [b, T, ...]: the oldest s slots leave
  (empty ones while the cache fills up); with ``sinks`` (full cache) slots sinks..sinks+s-1
  leave instead and the first ``sinks`` stay (StreamingLLM)."""
  s = new.shape[1]
  keep = [buf[:, s:]] if sinks is None else [buf[:, :sinks], buf[:, sinks + s:]]
  return jnp.concatenate(keep + [new.astype(buf.dtype)], axis=1)


class _CachedAttention:
  """Stands in for one block's ``Attention`` in a traced copy of the model: attends the
  chunk's queries to the cache (plus the chunk) and records the updated cache."""

  def __init__(self, attn, k_buf, v_buf, ctx):
    self.attn, self.k_buf, self.v_buf, self.ctx = attn, k_buf, v_buf, ctx

  def __call__(self, x, positions, enc, *, with_stats=False):
    del with_stats  # not available on the cached path
    b, s, _ = x.shape
    q, k, v = self.attn.project(x)
    self.k_buf = _write(self.k_buf, k, self.ctx["sinks"])
    self.v_buf = _write(self.v_buf, v, self.ctx["sinks"])
    if self.ctx["prefill"]:  # empty cache: the chunk's keys are all the valid keys
      q, k, v = self.attn.prepare(q, k, v, positions, positions, enc)
      out, _ = attend(q, k, v, positions, positions, enc, impl=self.attn.impl,
                      block_size=self.attn.block_size)
    else:  # a few queries over the cache; kv heads shared without copies where possible
      k_pos, valid, plain = self.ctx["k_pos"], self.ctx["valid"], plain_scores(enc)
      q, k, v = self.attn.prepare(q, self.k_buf, self.v_buf, positions, k_pos, enc,
                                  share_kv=not plain)
      if plain:
        out = grouped_attend(q, k, v, positions, k_pos, enc, valid)
      else:
        out, _ = full_attend(q, k, v, positions, k_pos, enc, key_mask=valid)
    return self.attn.out(out.reshape(b, s, -1)), None


def _compute_in_float32(model):
  """Sets every module's matmul dtype to float32 (in a traced copy of the model).

  Why, for the steps after the prompt: with a few tokens per step a bfloat16 matmul is
  all weight traffic, and XLA:CPU runs it as a float32 dot on weights rounded to bf16
  and back, every step (SmolLM2 at a 1k context: 88 % of a decode step converting
  weights; a batch-10 x 5-token P V product 34 vs 4.6 ms; benchmarks/README.md,
  "Decoding"). Float32 steps are faster and no less exact than the bf16 full forward."""
  for _, module in nnx.iter_modules(model):
    dtype = getattr(module, "dtype", None)
    if dtype is not None:
      object.__setattr__(module, "dtype", "float32" if isinstance(dtype, str) else jnp.float32)


def _make_step(graphdef):
  """jit f(state, k_bufs, v_bufs, tokens, q_pos, k_pos, valid, freqs, sinks, prefill,
  last_only) -> (logits [b, s or 1, V] float32, k_bufs, v_bufs). The prompt (``prefill``)
  runs in the model's matmul dtype, later steps in float32 (``_compute_in_float32``)."""

  def step(state, k_bufs, v_bufs, tokens, q_pos, k_pos, valid, freqs, sinks, prefill, last_only):
    model = nnx.merge(graphdef, state)  # a fresh copy: swapping its modules is local
    if not prefill:
      _compute_in_float32(model)
    if freqs is not None:  # length-dependent RoPE: this length's frequencies (module doc)
      object.__setattr__(model.posenc, "inv_freq", freqs[0])
      object.__setattr__(model.posenc, "attention_factor", freqs[1])
    ctx = {"k_pos": k_pos, "valid": valid, "sinks": sinks, "prefill": prefill}
    cached = [_CachedAttention(blk.attn, kb, vb, ctx)
              for blk, kb, vb in zip(model.blocks, k_bufs, v_bufs)]
    for blk, c in zip(model.blocks, cached):
      object.__setattr__(blk, "attn", c)
    hidden, _ = model.features(tokens, q_pos)
    if last_only:
      hidden = hidden[:, -1:]
    return (model.logits(hidden), tuple(c.k_buf for c in cached),
            tuple(c.v_buf for c in cached))

  return jit(step, static_argnames=("sinks", "prefill", "last_only"))


_STEPS = weakref.WeakKeyDictionary()


class CachedDecoder:
  """A KV cache of ``capacity`` tokens for a batch of ``batch`` sequences of ``model``.

  sinks: None = no eviction (feeding more than ``capacity`` tokens is an error); an int =
      StreamingLLM eviction keeping that many initial tokens.
  cache_positions: positions counted inside the cache (default: True when evicting).
  Positions are shared by the batch (prompts of equal length).
  """

  def __init__(self, model, batch, capacity, *, sinks=None, cache_positions=None):
    if capacity < 1:
      raise ValueError(f"cache capacity must be >= 1, got {capacity}")
    if sinks is not None and not 0 <= sinks < capacity:
      raise ValueError(f"sinks must be in [0, capacity={capacity}), got {sinks}")
    self.model, self.batch, self.capacity, self.sinks = model, batch, capacity, sinks
    self.cache_positions = sinks is not None if cache_positions is None else cache_positions
    graphdef, self.state = split_model(model)
    if model not in _STEPS:  # one compiled step per model, not per decoder (generate calls)
      _STEPS[model] = _make_step(graphdef)
    self._step = _STEPS[model]
    attn = model.blocks[0].attn
    kv_dtype = jax.eval_shape(attn.project, jax.ShapeDtypeStruct((1, 1, model.embedding.shape[1]),
                                                                 jnp.float32))[1].dtype
    shape = (batch, capacity, attn.num_kv_heads, attn.head_dim)
    self.k = tuple(jnp.zeros(shape, kv_dtype) for _ in model.blocks)
    self.v = tuple(jnp.zeros(shape, kv_dtype) for _ in model.blocks)
    self.pos = np.zeros(capacity, np.int32)  # absolute position of each slot (host side)
    self.length = 0  # valid (right-most) slots
    self.seen = 0  # tokens fed so far

  def feed(self, tokens, last_only=False):
    """Appends tokens [b, s] (int) and returns their logits [b, s, V] (float32), or only
    the last token's [b, 1, V] with ``last_only`` (a long prompt's logits are s x V floats:
    3.2 GB at 16k tokens of a 49k vocabulary)."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[0] != self.batch:
      raise ValueError(f"tokens must be [batch={self.batch}, s], got shape {tokens.shape}")
    s, free = tokens.shape[1], self.capacity - self.length
    if s > free and self.sinks is None:
      raise ValueError(f"cache full: {self.length} + {s} tokens > capacity {self.capacity} "
                       "(raise the capacity, or evict with sinks=...)")
    if s > free and s > 1:  # evicting: fill the free slots, then one token per eviction
      chunks = ([tokens[:, :free]] if free else []) + [tokens[:, i:i + 1] for i in range(free, s)]
      logits = [self.feed(c, last_only) for c in chunks]
      return logits[-1] if last_only else jnp.concatenate(logits, axis=1)
    return self._feed_chunk(tokens, last_only)

  def branch(self):
    """A decoder that continues from this one's current state and leaves it unchanged: it
    shares the cache buffers (jax arrays are immutable, so its steps write new buffers of
    their own). n continuations of one prompt (``evaluation.needle``'s candidate keys) cost
    n steps of batch 1 and no copy of the cache: copying a SmolLM2 8k prompt's cache into
    10 rows moved 3.8 GB and took 18.9 s a trial, ten branches take 2.3-2.7 s."""
    return copy.copy(self)

  def _feed_chunk(self, tokens, last_only):
    s = tokens.shape[1]
    evict = self.sinks if self.length + s > self.capacity else None
    new_length = min(self.length + s, self.capacity)
    if self.cache_positions:  # StreamingLLM: a slot's position is its rank in the cache
      q_pos = np.arange(new_length - s, new_length)
    else:
      q_pos = np.arange(self.seen, self.seen + s)
    self.pos = np.asarray(_write(self.pos[None], q_pos[None], evict))[0]
    if self.cache_positions:
      self.pos = np.maximum(np.arange(self.capacity) - (self.capacity - new_length), 0)
    self.model.check_positions(q_pos)
    valid = np.arange(self.capacity) >= self.capacity - new_length
    enc = self.model.posenc
    freqs = None
    if getattr(enc, "length_dependent", False):  # frequencies of the current length
      inv_freq, factor = enc.frequencies(int(q_pos.max()) + 1)
      freqs = (jnp.asarray(inv_freq), jnp.float32(factor))
    bcast = lambda a: jnp.asarray(np.broadcast_to(a, (self.batch, a.shape[-1])))
    # Prefill (empty cache, nothing evicted): attention over the chunk alone, by the model's
    # own path (blockwise when long), not over the whole buffer: the 16k needle prompt of a
    # pretrained model would otherwise build [s, capacity] logits per layer.
    prefill = self.length == 0 and evict is None
    logits, self.k, self.v = self._step(self.state, self.k, self.v, tokens, bcast(q_pos),
                                        bcast(self.pos), bcast(valid), freqs, sinks=evict,
                                        prefill=prefill, last_only=last_only)
    self.length, self.seen = new_length, self.seen + s
    return logits


def filtered_probs(logits, temperature=1.0, top_k=0, top_p=1.0):
  """Sampling distribution [..., V] of logits [..., V]: softmax(logits / temperature)
  restricted to the ``top_k`` most likely tokens (0 = all), then to the smallest set whose
  probability reaches ``top_p`` (nucleus, Holtzman et al. 2020, sec. 3.1), renormalised.
  temperature 0 = greedy (all mass on the argmax)."""
  if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {temperature}, "
                     f"{top_k}, {top_p}")
  logits = jnp.asarray(logits, jnp.float32)
  if temperature == 0:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1])
  probs = jax.nn.softmax(logits / temperature, axis=-1)
  order = jnp.argsort(-probs, axis=-1)
  sorted_p = jnp.take_along_axis(probs, order, axis=-1)
  rank = jnp.arange(probs.shape[-1])
  keep = (rank < top_k) if top_k else jnp.ones_like(rank, bool)
  kept = jnp.where(keep, sorted_p, 0.0)
  before = jnp.cumsum(kept, axis=-1) - kept  # mass of the more likely kept tokens
  keep &= before < top_p * jnp.sum(kept, axis=-1, keepdims=True)  # the first always stays
  kept = jnp.where(keep, sorted_p, 0.0)
  kept = kept / jnp.sum(kept, axis=-1, keepdims=True)
  return jnp.take_along_axis(kept, jnp.argsort(order, axis=-1), axis=-1)  # unsort


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def sample(logits, rng, temperature=1.0, top_k=0, top_p=1.0):
  """One token per row of logits [b, V] from ``filtered_probs``; greedy at temperature 0."""
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  probs = filtered_probs(logits, temperature, top_k, top_p)
  return jax.random.categorical(rng, jnp.log(probs), axis=-1).astype(jnp.int32)


def generate(model, prompt, max_new_tokens, *, temperature=0.0, top_k=0, top_p=1.0, seed=0,
             capacity=None, sinks=None, cache_positions=None):
  """Prefill ``prompt`` [b, P] (ints), then ``max_new_tokens`` sampled tokens, one cached
  step each. Returns [b, P + max_new_tokens] (numpy int32). ``capacity`` defaults to the
  whole sequence; with ``sinks`` the cache evicts (see ``CachedDecoder``). The same seed
  gives the same tokens."""
  prompt = np.asarray(prompt, np.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"prompt must be [batch, P >= 1] token ids, got shape {prompt.shape}")
  filtered_probs(jnp.zeros(1), temperature, top_k, top_p)  # validates the options early
  capacity = capacity or prompt.shape[1] + max_new_tokens
  dec = CachedDecoder(model, prompt.shape[0], capacity, sinks=sinks,
                      cache_positions=cache_positions)
  rng = jax.random.key(seed)
  logits = dec.feed(prompt, last_only=True)[:, -1]
  out = [prompt]
  for i in range(max_new_tokens):
    token = sample(logits, jax.random.fold_in(rng, i), temperature, top_k, top_p)
    out.append(np.asarray(token)[:, None])
    if i + 1 < max_new_tokens:
      logits = dec.feed(token[:, None])[:, -1]
  return np.concatenate(out, axis=1)
