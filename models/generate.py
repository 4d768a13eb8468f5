"""Autoregressive decoding with a key/value cache, for every registered encoding.

``CachedDecoder.feed(tokens)`` runs a chunk (a prompt, then one token at a time) through
the model against the cache and returns the chunk's logits; ``generate`` samples with it.
The first chunk into an empty cache (the prompt) attends over itself by the model's own
attention path (blockwise when long), so a 16k prompt never builds a [16k, capacity] matrix.
The model's own modules do the work: each block's attention is swapped, inside the traced
copy only, for ``_CachedAttention``, which calls ``Attention.project`` / ``prepare`` and
``full_attend`` like the full forward, so every positional hook applies unchanged:

* absolute encodings (``embed``): the new token is embedded at its own position;
* rotary encodings (``rotate``): a key is rotated once, when it enters the cache, at its
  own position (``rotate`` acts on each token by its own position). Where the rotation of a
  cached key changes later, the cache keeps keys *before* rotation and every step rotates
  them all: length-dependent frequencies (dynamic NTK, LongRoPE), whose keys all take the
  current length's rotation - Hugging Face transformers, which caches rotated keys, keeps
  the old scale for the old keys (issue huggingface/transformers#25104); here step n equals
  a full forward over n tokens - and positions counted inside an evicting cache. Piecewise
  RoPE methods (Self-Extend, DCA, ReRoPE, ...) rotate a key differently per part: the cache
  keeps each key under each of the rule's key maps (``enc.key_views``, one buffer per map),
  so a step rotates only its own queries and keys (``enc.view_scores``);
* bias families (``bias`` / ``scores``): logits from the cached key positions;
* CoPE: its gates sum over a query's row of keys; the empty slots and a chunk's later
  tokens, after the query, are kept out of the count by their positions (``CoPE.scores``).

Layout (benchmarks/README.md, "Decoding"): one [batch x kv heads, slots, head_dim] buffer
per layer for keys and one for values, so that each head's keys are contiguous and the
attention dots read them as they lie (``grouped_attend``), filled from slot 0: a step
writes its tokens in place (``lax.dynamic_update_slice`` on buffers the step owns and
donates) instead of shifting the whole cache. XLA:CPU keeps that update in place only for
this 3-d layout: with a separate batch axis it fused the update into each reader and
copied the cache for each, 4 copies per buffer per step (measured). A slot's position is
its index (contiguous positions); empty slots lie after every query and are masked per
query (``mask``).

Eviction (StreamingLLM, Xiao et al. 2024, arXiv 2309.17453, sec. 3.2): with ``sinks``,
a full cache keeps its first ``sinks`` tokens and drops the oldest of the rest (a shift of
the cache, once per token once full); positions are then counted inside the cache
(``cache_positions``), as in the paper, so no distance exceeds the cache size.
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


def to_cache(x):
  """[b, s, kv, d] (the model's layout) -> [b * kv, s, d] (the cache's, module doc)."""
  b, s, kv, d = x.shape
  return jnp.swapaxes(x, 1, 2).reshape(b * kv, s, d)


def from_cache(x, batch):
  """[b * kv, s, d] -> [b, s, kv, d]."""
  return jnp.swapaxes(x.reshape(batch, -1, *x.shape[1:]), 1, 2)


def _write(buf, new, start, sinks):
  """new [n, s, d] into buf [n, T, d] at slots start..start+s-1 (in place when buf is
  donated); with ``sinks`` (a full cache) slots sinks..sinks+s-1 leave instead, the later
  ones move down by s and new takes the last s (StreamingLLM)."""
  new = new.astype(buf.dtype)
  if sinks is None:
    return jax.lax.dynamic_update_slice(buf, new, (0, start, 0))
  s = new.shape[1]
  return jnp.concatenate([buf[:, :sinks], buf[:, sinks + s:], new], axis=1)


class _CachedAttention:
  """Stands in for one block's ``Attention`` in a traced copy of the model: attends the
  chunk's queries to the cache (plus the chunk) and records the updated cache."""

  def __init__(self, attn, k_buf, v_buf, ctx):
    self.attn, self.k_buf, self.v_buf, self.ctx = attn, k_buf, v_buf, ctx

  def __call__(self, x, positions, enc, *, with_stats=False):
    del with_stats  # not available on the cached path
    b, s, _ = x.shape
    q, k, v = self.attn.project(x)
    rotated = self.ctx["rotated"]
    if rotated:  # the chunk's keys enter the cache rotated (module doc)
      q, k = enc.rotate(q, k, positions, positions)
    start, sinks = self.ctx["start"], self.ctx["sinks"]
    if isinstance(self.k_buf, tuple):  # a piecewise rule: each key's rotations (_key_views)
      self.k_buf = tuple(_write(buf, to_cache(view), start, sinks)
                         for buf, view in zip(self.k_buf, enc.key_views(k, positions)))
    else:
      self.k_buf = _write(self.k_buf, to_cache(k), start, sinks)
    self.v_buf = _write(self.v_buf, to_cache(v), start, sinks)
    if self.ctx["prefill"]:  # empty cache: the chunk's keys are all the valid keys
      q, k, v = self.attn.prepare(q, k, v, positions, positions, enc, rotate=not rotated)
      out, _ = attend(q, k, v, positions, positions, enc, impl=self.attn.impl,
                      block_size=self.attn.block_size)
    else:
      out = self._attend_cache(q, positions, enc, rotate=not rotated)
    return self.attn.out(out.reshape(b, s, -1)), None

  def _attend_cache(self, q, q_pos, enc, rotate):
    """A few queries over the whole cache; kv heads shared without copies where the logits
    are plain q.k + bias (``grouped_attend``), else by the full path's hooks (whose causal
    offset, queries last, masks no valid key of a cache filled from slot 0: ``mask`` does)."""
    k_pos, mask, plain = self.ctx["k_pos"], self.ctx["mask"], plain_scores(enc)
    if isinstance(self.k_buf, tuple) or (plain and not rotate):  # the cache as it is
      return grouped_attend(self.attn.scale_queries(q, q_pos), self.k_buf, self.v_buf, q_pos,
                            k_pos, enc, mask)
    b = q.shape[0]
    fold = not plain and enc.same_rule_every_head
    q, k, v = self.attn.prepare(q, from_cache(self.k_buf, b), from_cache(self.v_buf, b), q_pos,
                                k_pos, enc, share_kv=not (plain or fold), rotate=rotate)
    if plain:
      return grouped_attend(q, to_cache(k), to_cache(v), q_pos, k_pos, enc, mask)
    if fold:
      return folded_attend(q, k, v, q_pos, k_pos, enc, mask)
    return full_attend(q, k, v, q_pos, k_pos, enc, key_mask=mask)[0]


def folded_attend(q, k, v, q_pos, k_pos, enc, key_mask):
  """Attention of queries q [b, s, h, d] over keys k / v [b, t, kv, d] with kv <= h heads
  (grouped-query attention when kv < h), for an encoding whose logits treat every head
  alike (``same_rule_every_head``: piecewise RoPE methods over unrotated keys, where cached
  positions move; elsewhere they read their key views in ``grouped_attend``): each kv
  head's h / kv query heads become h / kv times the query rows of one head, so the rule
  rotates and scores the cache's kv heads, not h / kv copies of each (Self-Extend over a
  SmolLM2 8k cache: 140 ms a layer for 4 queries over the copies, 37 ms folded)."""
  b, s, h, d = q.shape
  kv = k.shape[2]
  g = h // kv
  rows = lambda x: jnp.repeat(x, g, axis=1)  # query i's g rows: i * g .. i * g + g - 1
  q = q.reshape(b, s, kv, g, d).swapaxes(2, 3).reshape(b, s * g, kv, d)
  out = full_attend(q, k, v, rows(q_pos), k_pos, enc, key_mask=rows(key_mask), causal=False)[0]
  return out.reshape(b, s, g, kv, d).swapaxes(2, 3).reshape(b, s, h, d)


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


def _make_steps(graphdef):
  """(donating, copying) jit of f(state, k_bufs, v_bufs, tokens, q_pos, k_pos, start, freqs,
  sinks, prefill, last_only, rotated) -> (logits [b, s or 1, V] float32, k_bufs, v_bufs):
  the chunk's tokens enter the cache at slot ``start``. The prompt (``prefill``) runs in the
  model's matmul dtype, later steps in float32 (``_compute_in_float32``). The donating one
  writes the cache in place; the copying one serves buffers a branch shares."""

  def step(state, k_bufs, v_bufs, tokens, q_pos, k_pos, start, freqs, sinks, prefill,
           last_only, rotated):
    model = nnx.merge(graphdef, state)  # a fresh copy: swapping its modules is local
    if not prefill:
      _compute_in_float32(model)
    if freqs is not None:  # length-dependent RoPE: this length's frequencies (module doc)
      object.__setattr__(model.posenc, "inv_freq", freqs[0])
      object.__setattr__(model.posenc, "attention_factor", freqs[1])
    s, capacity = tokens.shape[1], v_bufs[0].shape[1]
    mask = jnp.arange(capacity)[None, None, :] <= start + jnp.arange(s)[None, :, None]
    ctx = {"k_pos": k_pos, "mask": mask, "start": start, "sinks": sinks, "prefill": prefill,
           "rotated": rotated}
    cached = [_CachedAttention(blk.attn, kb, vb, ctx)
              for blk, kb, vb in zip(model.blocks, k_bufs, v_bufs)]
    for blk, c in zip(model.blocks, cached):
      object.__setattr__(blk, "attn", c)
    hidden, _ = model.features(tokens, q_pos)
    if last_only:
      hidden = hidden[:, -1:]
    return (model.logits(hidden), tuple(c.k_buf for c in cached),
            tuple(c.v_buf for c in cached))

  static = ("sinks", "prefill", "last_only", "rotated")
  return (jit(step, static_argnames=static, donate_argnames=("k_bufs", "v_bufs")),
          jit(step, static_argnames=static))


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
    # Keys cached rotated unless a cached key's rotation can change (module doc).
    self.rotated = not (getattr(model.posenc, "length_dependent", False) or self.cache_positions)
    graphdef, self.state = split_model(model)
    if model not in _STEPS:  # compiled steps per model, not per decoder (generate calls)
      _STEPS[model] = _make_steps(graphdef)
    self._donating_step, self._copying_step = _STEPS[model]
    attn = model.blocks[0].attn
    kv_dtype = jax.eval_shape(attn.project, jax.ShapeDtypeStruct((1, 1, model.embedding.shape[1]),
                                                                 jnp.float32))[1].dtype
    shape = (batch * attn.num_kv_heads, capacity, attn.head_dim)  # the layout: module doc
    zeros = lambda: jnp.zeros(shape, kv_dtype)
    views = self._key_views(model, attn)  # 0: one buffer of keys per layer
    self.k = tuple(tuple(zeros() for _ in range(views)) if views else zeros()
                   for _ in model.blocks)
    self.v = tuple(zeros() for _ in model.blocks)
    self.shared = False  # whether another decoder holds these buffers (``branch``)
    # Position of each slot: its index while positions are contiguous from 0 (and for
    # cache_positions); absolute positions move with eviction otherwise.
    self.pos = np.arange(capacity, dtype=np.int32)
    self.length = 0  # valid slots, from slot 0
    self.seen = 0  # tokens fed so far

  def _key_views(self, model, attn):
    """How many rotations of each key the cache keeps (``enc.key_views``: a piecewise rule's
    key maps), or 0 (one buffer of keys as ``rotate`` gives them). Only where a cached key's
    rotation never changes (``rotated``)."""
    if not self.rotated:
      return 0
    k = jax.ShapeDtypeStruct((1, 1, attn.num_kv_heads, attn.head_dim), jnp.float32)
    pos = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    views = jax.eval_shape(model.posenc.key_views, k, pos)
    return 0 if views is None else len(views)

  def feed(self, tokens, last_only=False):
    """Appends tokens [b, s] (int) and returns their logits [b, s, V] (float32), or only
    the last token's [b, 1, V] with ``last_only`` (a long prompt's logits are s x V floats:
    3.2 GB at 16k tokens of a 49k vocabulary)."""
    tokens = self._checked(tokens)
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
    shares the cache buffers, so neither writes them in place until its next step has made
    buffers of its own (a copy of the whole cache, at that step). For continuations that
    go on side by side; ``peek`` scores continuations taken one at a time without the copy."""
    self.shared = True
    return copy.copy(self)

  def peek(self, tokens, last_only=False):
    """The logits ``feed(tokens)`` would return, leaving the decoder where it was: the
    tokens are written into free slots, which every later step masks out until it writes
    its own tokens there, and the decoder's length does not move. So n continuations of one
    prompt (``evaluation.needle``'s candidate keys) cost n in-place steps and no copy of the
    cache, where ``branch().feed`` copies every buffer once per continuation (a SmolLM2
    32k Self-Extend cache: 2.1 GiB, two key views and the values of 30 layers in float32)."""
    tokens = self._checked(tokens)
    if self.length + tokens.shape[1] > self.capacity:
      raise ValueError(f"peek needs free slots: {self.length} + {tokens.shape[1]} tokens > "
                       f"capacity {self.capacity} (peek never evicts)")
    return self._feed_chunk(tokens, last_only, keep=False)

  def _checked(self, tokens):
    """tokens as an int32 [batch, s] array, or a ValueError naming the expected shape."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2 or tokens.shape[0] != self.batch:
      raise ValueError(f"tokens must be [batch={self.batch}, s], got shape {tokens.shape}")
    return tokens

  def _feed_chunk(self, tokens, last_only, keep=True):
    """Runs one chunk; ``keep``: the decoder's length (and positions) advance past it."""
    s = tokens.shape[1]
    evict = self.sinks if self.length + s > self.capacity else None
    new_length = min(self.length + s, self.capacity)
    start = new_length - s  # the chunk's first slot
    if self.cache_positions:  # StreamingLLM: a slot's position is its rank in the cache
      q_pos = np.arange(start, new_length)
    else:
      q_pos = np.arange(self.seen, self.seen + s)
      if evict is not None:
        self.pos = np.concatenate([self.pos[:evict], self.pos[evict + s:], q_pos])
    self.model.check_positions(q_pos)
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
    step = self._copying_step if self.shared else self._donating_step
    logits, self.k, self.v = step(self.state, self.k, self.v, tokens, bcast(q_pos),
                                  bcast(self.pos), np.int32(start), freqs, sinks=evict,
                                  prefill=prefill, last_only=last_only, rotated=self.rotated)
    self.shared = False  # the step's outputs are new buffers, this decoder's alone
    if keep:
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
