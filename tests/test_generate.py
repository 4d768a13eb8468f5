"""KV-cache decoding (models/generate.py): cached step-by-step logits equal the full forward
for every registered encoding and every RoPE variant (also past the training length),
dynamic NTK re-rotates cached keys at the current length (HF transformers #25104),
StreamingLLM eviction, branches and in-place peeks, sampling (greedy, seeds, top-k / top-p
renormalisation)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import extensions
import extensions.piecewise
import posenc
from configs.common import resolve
from evaluation.runner import variant_model
from models import build_model
from models import generate as generate_module
from models.generate import (CachedDecoder, _compute_in_float32, filtered_probs, generate,
                             sample)

TRAIN_LEN = 16
LENGTH = 48  # 3x the training length
# float32: max |cached - full| <= 1e-5 x the largest |logit| (the sharpened models' logits
# reach ~7; measured max abs 1.6e-5, i.e. <= 3e-6 relative, for every encoding including
# NoPE: matmul rounding of a 1-row vs a 48-row product, not position handling; 3e-7 abs at
# random init, where logits are ~0.1).
F32_TOL = 1e-5
BF16_TOL = 0.1  # bf16 matmul inputs: cached and full round at different points (a bound, x logit scale)


def _sharpen(model, seed=0):
  """Scales every parameter by 3 and adds noise, so attention is peaked and logits spread
  (std ~1): a random-init model is near uniform and would pass any tolerance vacuously."""
  state = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  leaves = [3.0 * x + 0.05 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(tree, leaves))
  return model


def _model(name, tiny_config, layers=2, **overrides):
  config = resolve(tiny_config(posenc=name, train_len=TRAIN_LEN,
                               **{"model.num_layers": layers, **overrides}))
  return config, _sharpen(build_model(config))


def _tokens(length=LENGTH, batch=2, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, 256)


def _full(model, tokens, offset=0):
  pos = jnp.broadcast_to(jnp.arange(tokens.shape[1]) + offset, tokens.shape)
  return model(tokens, pos)


def _cached(model, tokens, chunks=(8, 5), **kw):
  """Logits of tokens fed as the given leading chunks, then one token at a time."""
  dec = CachedDecoder(model, tokens.shape[0], kw.pop("capacity", tokens.shape[1]), **kw)
  out, i = [], 0
  for c in chunks:
    out.append(dec.feed(tokens[:, i:i + c]))
    i += c
  out += [dec.feed(tokens[:, j:j + 1]) for j in range(i, tokens.shape[1])]
  return jnp.concatenate(out, axis=1)


def _max_diff(a, b):
  """max |a - b| relative to the logit scale max(1, max |b|) (see F32_TOL)."""
  return float(jnp.max(jnp.abs(a - b))) / max(1.0, float(jnp.max(jnp.abs(b))))


@pytest.mark.parametrize("name", posenc.names())
def test_cached_equals_full_every_encoding(name, tiny_config):
  _, model = _model(name, tiny_config)
  tokens = _tokens()
  full = _full(model, tokens)
  assert float(jnp.std(full)) > 0.5  # non-vacuous: logits are far from uniform
  assert _max_diff(_cached(model, tokens), full) <= F32_TOL


@pytest.mark.parametrize("name", ["rope", "alibi", "t5_bias", "cope"])
def test_cached_equals_full_grouped_query_attention(name, tiny_config):
  """4 query heads reading 2 kv heads: the decode steps share each cached kv head without
  copying it (``grouped_attend``; bias heads in (kv, group) order: ALiBi's per-head slopes
  and T5's per-head buckets would land on the wrong heads otherwise); CoPE, whose logits
  have a rule of their own, takes the shared-copy path."""
  _, model = _model(name, tiny_config, **{"model.num_heads": 4, "model.num_kv_heads": 2})
  assert model.blocks[0].attn.num_kv_heads == 2
  tokens = _tokens()
  assert _max_diff(_cached(model, tokens), _full(model, tokens)) <= F32_TOL


@pytest.mark.parametrize("variant", [v for v in extensions.names()
                                     if v not in ("none", "dynamic", "longrope")])
def test_cached_equals_full_every_rope_variant(variant, tiny_config):
  """Every context-extension variant with its defaults (factor=auto, windows from train_len)
  at 3x the training length; dynamic NTK and LongRoPE have their own test (length-dependent)."""
  config, model = _model("rope", tiny_config)
  spec = extensions.parse_variants(variant)[0]
  model = variant_model(model, extensions.apply_variant(config, spec, LENGTH))
  tokens = _tokens()
  assert _max_diff(_cached(model, tokens), _full(model, tokens)) <= F32_TOL


PIECEWISE = [v for v in extensions.names()
             if isinstance(extensions.get(v), extensions.piecewise.PiecewiseRoPE)]


def _piecewise_gqa_model(variant, tiny_config):
  """4 query heads reading 2 kv heads under a piecewise RoPE method at 3x train_len."""
  config, model = _model("rope", tiny_config, **{"model.num_heads": 4, "model.num_kv_heads": 2})
  spec = extensions.parse_variants(variant)[0]
  return variant_model(model, extensions.apply_variant(config, spec, LENGTH))


@pytest.mark.parametrize("variant", PIECEWISE)
def test_piecewise_steps_rotate_only_their_own_tokens(variant, tiny_config, monkeypatch):
  """The cache keeps each key under each of the rule's key maps (``enc.key_views``), so every
  rotation a decode step makes is of its own tokens (at most the largest chunk fed, 8), never
  of the 48 cached keys, and the steps still equal the full forward."""
  model = _piecewise_gqa_model(variant, tiny_config)
  rotated_lengths = []
  real = posenc.rope.apply_rope
  monkeypatch.setattr(posenc.rope, "apply_rope",
                      lambda x, *a: rotated_lengths.append(x.shape[1]) or real(x, *a))
  tokens = _tokens()
  got = _cached(model, tokens)
  assert max(rotated_lengths) == 8  # the prompt chunk; a step rotating its cache would show 48
  assert isinstance(CachedDecoder(model, 2, LENGTH).k[0], tuple)  # one buffer per key map
  assert _max_diff(got, _full(model, tokens)) <= F32_TOL


@pytest.mark.parametrize("variant", PIECEWISE)
def test_piecewise_steps_over_moving_positions_fold_the_query_heads(variant, tiny_config,
                                                                   monkeypatch):
  """Where a cached key's rotation can change (positions counted inside the cache), keys stay
  unrotated and each step scores each cached kv head once, its two query heads stacked as
  query rows (``folded_attend``); a cache filled from slot 0 without eviction has the
  absolute positions, so the steps equal the full forward."""
  model = _piecewise_gqa_model(variant, tiny_config)
  folded = []
  real = generate_module.folded_attend
  monkeypatch.setattr(generate_module, "folded_attend",
                      lambda q, k, *a: folded.append(q.shape[2] // k.shape[2]) or real(q, k, *a))
  tokens = _tokens()
  got = _cached(model, tokens, cache_positions=True)
  assert _max_diff(got, _full(model, tokens)) <= F32_TOL
  assert folded and set(folded) == {2}


def _dynamic(config, eval_len, rope_type="dynamic"):
  spec = extensions.parse_variants(f"{rope_type}:factor=2")[0]
  return extensions.apply_variant(config, spec, eval_len)


def _decode_logits(model, tokens, prompt=8):
  dec = CachedDecoder(model, tokens.shape[0], tokens.shape[1])
  out = [dec.feed(tokens[:, :prompt])]
  out += [dec.feed(tokens[:, n:n + 1]) for n in range(prompt, tokens.shape[1])]
  return jnp.concatenate(out, axis=1)


def _frozen(model):
  """The stale cache of HF transformers #25104: frequencies kept from the prompt length."""
  fixed = model.posenc.frequencies(8)
  object.__setattr__(model.posenc, "frequencies", lambda n: fixed)
  return model


CHECK_LENGTHS = (12, 16, 17, 24, 40)  # across the original length 16


@pytest.mark.parametrize("layers", [1, 2])
def test_dynamic_ntk_rerotates_cached_keys_at_every_length(layers, tiny_config):
  """Step n of the cached decode uses the frequencies of length n for every cached key.
  One layer: equals a full forward over the first n tokens with those frequencies, where
  freezing them at the prompt (HF transformers #25104) does not. Two layers: no cache can
  be exact past the original length, since layer-1 outputs of *earlier* tokens (hence the
  layer-2 keys and values) change with the frequencies; re-rotation still beats the
  frozen cache (re-rotated: up to 0.15 x logit scale over lengths 17..40, measured)."""
  config, run = _model("rope", tiny_config, layers=layers)
  tokens = _tokens(40, batch=1)
  model = variant_model(run, _dynamic(config, 8))  # built at the prompt length
  assert model.posenc.length_dependent
  got = _decode_logits(model, tokens)
  stale = _decode_logits(_frozen(variant_model(run, _dynamic(config, 8))), tokens)
  errors, stale_errors = [], []
  for n in CHECK_LENGTHS:
    want = _full(variant_model(run, _dynamic(config, n)), tokens[:, :n])[:, -1]
    errors.append(_max_diff(got[:, n - 1], want))
    stale_errors.append(_max_diff(stale[:, n - 1], want))
  past = [i for i, n in enumerate(CHECK_LENGTHS) if n > TRAIN_LEN]
  assert max(errors[i] for i in range(len(errors)) if i not in past) <= F32_TOL
  assert min(stale_errors[i] for i in past) > 1e-3  # the frozen scale is measurably wrong
  if layers == 1:
    assert max(errors) <= F32_TOL
  else:
    assert all(errors[i] < stale_errors[i] for i in past)


def test_longrope_switches_factors_past_the_original_length(tiny_config):
  """LongRoPE picks short / long factors by length (one layer: exact, as dynamic NTK)."""
  config, run = _model("rope", tiny_config, layers=1)
  half = config.model.head_dim // 2
  factors = lambda xs: "[" + ",".join(str(x) for x in xs) + "]"
  spec = extensions.parse_variants(
      f"longrope:short_factor={factors([1.0] * half)},"
      f"long_factor={factors([1.0 + i for i in range(half)])}")[0]
  model_at = lambda n: variant_model(run, extensions.apply_variant(config, spec, n))
  tokens = _tokens(24, batch=1)
  got = _decode_logits(model_at(8), tokens)
  for n in (16, 17, 24):
    assert _max_diff(got[:, n - 1], _full(model_at(n), tokens[:, :n])[:, -1]) <= F32_TOL
  assert _max_diff(_full(model_at(24), tokens), _full(model_at(16), tokens)) > 1e-3


@pytest.mark.parametrize("name", posenc.names())
def test_prefill_is_blockwise_and_last_only_is_the_last_row(name, tiny_config):
  """A prompt into an empty cache runs the model's own attention path: blockwise (block 8,
  5 blocks) gives the full-attention logits; ``last_only`` returns exactly the last row."""
  _, model = _model(name, tiny_config, **{"model.attention": "blockwise", "model.block_size": 8})
  tokens = _tokens(40)
  for blk in model.blocks:
    blk.attn.impl = "full"
  full = _full(model, tokens)
  for blk in model.blocks:
    blk.attn.impl = "blockwise"
  assert _max_diff(CachedDecoder(model, 2, 48).feed(tokens), full) <= F32_TOL
  last = CachedDecoder(model, 2, 48).feed(tokens, last_only=True)
  assert last.shape == (2, 1, full.shape[-1])
  assert _max_diff(last, full[:, -1:]) <= F32_TOL


@pytest.mark.parametrize("name", ["rope", "alibi", "t5_bias"])
def test_streaming_eviction_equals_full_forward_on_kept_tokens(name, tiny_config):
  """One layer (so cached keys do not depend on evicted context): after eviction the
  logits equal a full forward over [sinks | most recent] at positions 0..capacity-1."""
  _, model = _model(name, tiny_config, layers=1)
  tokens = _tokens(30, batch=1)
  sinks, capacity = 2, 10
  dec = CachedDecoder(model, 1, capacity, sinks=sinks)
  logits = dec.feed(tokens[:, :12])  # longer than the cache: streamed in
  for n in range(13, 31):
    logits = dec.feed(tokens[:, n - 1:n])
    kept = jnp.concatenate([tokens[:, :sinks], tokens[:, n - capacity + sinks:n]], axis=1)
    assert _max_diff(logits, _full(model, kept)[:, -1:]) <= F32_TOL


@pytest.mark.parametrize("dtype_name", ["bfloat16"])
@pytest.mark.parametrize("name", ["rope", "alibi", "cope"])
def test_cached_equals_full_bf16(name, dtype_name, tiny_config):
  _, model = _model(name, tiny_config, **{"model.dtype": dtype_name})
  tokens = _tokens()
  assert _max_diff(_cached(model, tokens), _full(model, tokens)) <= BF16_TOL


@pytest.mark.parametrize("name", ["rope", "cope"])
def test_steps_after_the_prompt_compute_in_float32(name, tiny_config):
  """The helper the cached steps after the prompt use turns a bfloat16 model into its
  float32 twin: no module keeps a bf16 matmul (one left would differ by ~1e-2)."""
  config, model = _model(name, tiny_config, **{"model.dtype": "bfloat16"})
  config.model.dtype = "float32"
  twin = variant_model(model, config)
  tokens = _tokens()
  assert _max_diff(_full(model, tokens), _full(twin, tokens)) > 1e-3  # bf16 is visible
  graphdef, state = nnx.split(model)
  copy = nnx.merge(graphdef, state)
  _compute_in_float32(copy)
  assert _max_diff(_full(copy, tokens), _full(twin, tokens)) <= 1e-6


def test_greedy_generation_equals_repeated_full_forward_argmax(tiny_config):
  _, model = _model("rope", tiny_config)
  prompt, steps = np.asarray(_tokens(6, batch=2)), 20
  got = generate(model, prompt, steps, temperature=0.0)
  # the full forward over a fixed zero-padded buffer (one compile): causal, so the logits
  # at index t see tokens 0..t only
  graphdef, state = nnx.split(model)
  full = jax.jit(lambda st, x: _full(nnx.merge(graphdef, st), x))
  seq = np.zeros((2, 6 + steps), np.int32)
  seq[:, :6] = prompt
  for t in range(6, 6 + steps):
    seq[:, t] = np.asarray(jnp.argmax(full(state, seq)[:, t - 1], axis=-1))
  np.testing.assert_array_equal(got, seq)
  assert len(set(got[0, 6:].tolist())) > 1  # not a degenerate constant continuation


def test_sampling_with_a_seed_is_reproducible(tiny_config):
  _, model = _model("alibi", tiny_config)
  prompt = _tokens(5, batch=1)
  kw = dict(temperature=1.0, top_k=50, top_p=0.95)
  a, b = (generate(model, prompt, 12, seed=7, **kw) for _ in range(2))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, generate(model, prompt, 12, seed=8, **kw))


def test_top_k_and_top_p_renormalise():
  p = jnp.array([0.05, 0.5, 0.15, 0.3])
  logits = jnp.log(p)
  np.testing.assert_allclose(filtered_probs(logits, 1.0, top_k=2), [0, 0.625, 0, 0.375], atol=1e-6)
  # nucleus: smallest set reaching top_p (0.5 + 0.3 = 0.8 >= 0.8)
  np.testing.assert_allclose(filtered_probs(logits, 1.0, top_p=0.8), [0, 0.625, 0, 0.375],
                             atol=1e-6)
  np.testing.assert_allclose(filtered_probs(logits, 1.0, top_p=0.81),
                             [0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95], atol=1e-6)
  # top-p on the top-k renormalised distribution (HF warper order)
  np.testing.assert_allclose(filtered_probs(logits, 1.0, top_k=2, top_p=0.6), [0, 1, 0, 0],
                             atol=1e-6)
  np.testing.assert_allclose(filtered_probs(logits, 0.0), [0, 1, 0, 0])
  t = filtered_probs(logits, 2.0)  # temperature: softmax(log p / 2) ~ sqrt(p)
  np.testing.assert_allclose(t, np.sqrt(p) / np.sqrt(p).sum(), rtol=1e-5)


def test_samples_follow_the_filtered_distribution():
  logits = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]] * 20000))
  tokens = np.asarray(sample(logits, jax.random.key(0), 1.0, top_p=0.81))
  freq = np.bincount(tokens, minlength=4) / tokens.size
  np.testing.assert_allclose(freq, [0, 0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95], atol=0.015)


def test_clear_errors(tiny_config):
  _, model = _model("rope", tiny_config, layers=1)
  dec = CachedDecoder(model, 1, 4)
  dec.feed(_tokens(4, batch=1))
  with pytest.raises(ValueError, match="cache full"):
    dec.feed(_tokens(1, batch=1))
  with pytest.raises(ValueError, match="top_p"):
    generate(model, _tokens(2, batch=1), 2, top_p=0.0)
  with pytest.raises(ValueError, match="sinks"):
    CachedDecoder(model, 1, 4, sinks=4)


def test_learned_table_limit_is_checked_before_compute(tiny_config):
  _, model = _model("learned", tiny_config, layers=1, **{"posenc.learned.max_len": 8})
  dec = CachedDecoder(model, 1, 12)
  dec.feed(_tokens(8, batch=1))
  with pytest.raises(ValueError, match="supports positions 0..7"):
    dec.feed(_tokens(1, batch=1))


def test_branches_continue_the_prefix_and_leave_it_unchanged(tiny_config):
  """Each branch of a prompt's cache scores its continuation as a fresh decoder fed prompt +
  continuation would, and the prompt's decoder is unchanged by its branches' steps."""
  _, model = _model("rope", tiny_config)
  prompt, conts = _tokens(20, batch=1), _tokens(6, batch=3, seed=1)
  dec = CachedDecoder(model, 1, 26)
  dec.feed(prompt)
  for c in conts:  # several branches in turn, each from the same prefix
    got = dec.branch().feed(c[None])
    want = _full(model, jnp.concatenate([prompt, c[None]], axis=1))[:, 20:]
    assert _max_diff(got, want) <= F32_TOL
  assert dec.length == dec.seen == 20  # the parent's own next step sees only the prompt
  want = _full(model, jnp.concatenate([prompt, conts[2:, :1]], axis=1))[:, 20:]
  assert _max_diff(dec.feed(conts[2:, :1]), want) <= F32_TOL


def _peek_model(kind, tiny_config):
  """(model, tokens -> full-forward logits) for ``test_peek...``: dynamic NTK in one layer,
  where the full forward at each length is exact (``test_dynamic_ntk...``)."""
  if kind == "dynamic":
    config, run = _model("rope", tiny_config, layers=1)
    return (variant_model(run, _dynamic(config, 8)),
            lambda t: _full(variant_model(run, _dynamic(config, t.shape[1])), t))
  model = (_piecewise_gqa_model(kind, tiny_config) if kind == "self_extend"
           else _model(kind, tiny_config)[1])
  return model, functools.partial(_full, model)


@pytest.mark.parametrize("kind", ["rope", "alibi", "cope", "self_extend", "dynamic"])
def test_peek_scores_continuations_in_place_and_leaves_the_decoder(kind, tiny_config):
  """``peek`` returns exactly what ``branch().feed`` returns (the same step, in place instead
  of on a copy of the cache), whatever an earlier peek left in the free slots, equals the
  full forward, and the decoder's next step sees only its own tokens. Kinds: rotated keys,
  a bias, CoPE's gates over the slots, a piecewise rule's key views, keys cached unrotated."""
  model, full_of = _peek_model(kind, tiny_config)
  prompt, conts = _tokens(20, batch=1), _tokens(6, batch=3, seed=1)
  dec = CachedDecoder(model, 1, 26)
  dec.feed(prompt)
  peeked = []
  for c in conts:
    before = jax.tree.leaves(dec.k[0])[0]
    peeked.append(dec.peek(c[None]))
    assert before.is_deleted()  # written in place, not copied
    full = full_of(jnp.concatenate([prompt, c[None]], axis=1))[:, 20:]
    assert _max_diff(peeked[-1], full) <= F32_TOL
  for c, got in zip(conts, peeked):
    assert jnp.array_equal(got, dec.branch().feed(c[None]))
  assert dec.length == dec.seen == 20
  want = full_of(jnp.concatenate([prompt, conts[2:, :1]], axis=1))[:, 20:]
  assert _max_diff(dec.feed(conts[2:, :1]), want) <= F32_TOL
  with pytest.raises(ValueError, match="peek needs free slots: 21 \\+ 6 tokens > capacity 26"):
    dec.peek(conts[:1])


def test_steps_update_the_cache_in_place_except_shared_buffers(tiny_config):
  """A decoder that owns its cache donates it to the step (the update is in place: the old
  buffers are gone), while buffers a branch shares survive the branch's and the parent's
  next steps, so both continue exactly (the copying step)."""
  _, model = _model("alibi", tiny_config)
  tokens = _tokens(12, batch=1)
  dec = CachedDecoder(model, 1, 16)
  dec.feed(tokens[:, :8])
  before = dec.k[0]
  dec.feed(tokens[:, 8:9])
  assert before.is_deleted()  # donated: written in place
  shared = dec.k[0]
  child = dec.branch()
  got_child = child.feed(tokens[:, 9:10])
  got_parent = dec.feed(tokens[:, 9:11])
  assert not shared.is_deleted()
  want = _full(model, tokens[:, :11])
  assert _max_diff(got_child, want[:, 9:10]) <= F32_TOL
  assert _max_diff(got_parent, want[:, 9:11]) <= F32_TOL
  after = dec.k[0]
  dec.feed(tokens[:, 11:12])  # the parent owns fresh buffers again
  assert after.is_deleted()
