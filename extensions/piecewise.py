"""Piecewise RoPE logits: the one hook extension shared by ReRoPE, Self-Extend, Dual Chunk
Attention, STRING, LM-Infinite and StreamingLLM.

Each of these methods gives a (query, key) pair the RoPE logit of *other* positions than
(q_pos, k_pos): a few "parts", each a pair of position maps (query map, key map) applied
before rotating, and a per-pair choice of part (or "not attended", for masks other than
causal). So one block of logits is

  S[i, j] = R(f_c(q_i)) q_i . R(g_c(k_j)) k_j   with c = select(q_pos_i, k_pos_j)
  S[i, j] = NEG_INF                             where select = -1

Maps act on one position at a time and ``select`` on a pair, so a (query block, key block)
tile needs only its own positions: the methods run blockwise (no L x L matrix) and equal
the full computation. The RoPE encoding calls ``scores`` when its config has a
``scores_rule`` (JSON ``{"name": ..., params}``, written by ``PiecewiseRoPE.configure``)
and then leaves q and k unrotated in ``rotate``.

On the CPU, evaluation runs the same rule in the fused attention kernel
(``models.cpu_attention.piecewise_attention``) for every method that declares its
``kernel_form``: the part of a pair is a function of clamp(q // div - k // div) and of
whether the key is a sink, read into two small tables from ``select`` itself.
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from extensions import Extension, get
from models.fast_attention import NEG_INF
from posenc.base import grouped_qk, qk_dot


def same(p):
  """The identity position map (ordinary RoPE for that side)."""
  return p


def const(value):
  """A position map sending every position to ``value``."""
  return lambda p: jnp.full_like(p, value)


class PiecewiseRoPE(Extension):
  """A method given by ``parts`` (position maps) and ``select`` (which part per pair)."""

  exclusive = "piecewise method (each chooses the logits)"
  masks = False  # whether ``select`` ever says -1 (a mask beyond causal, e.g. the Lambda)

  def configure(self, config, params, eval_len):
    config.posenc[config.posenc.name].scores_rule = json.dumps({"name": self.name, **params})

  def parts(self, params):
    """[(query map, key map)]: part c rotates q at f_c(q_pos) and k at g_c(k_pos)."""
    raise NotImplementedError

  def select(self, params, q_pos, k_pos):
    """Part index per pair (int array broadcast from q_pos [b,1,sq,1], k_pos [b,1,1,sk]);
    -1 = not attended."""
    raise NotImplementedError

  def kernel_form(self, params):
    """(div, sinks, classes) when ``select`` is a function of the class
    clamp(q // div - k // div, 0, classes - 1) and of whether the key is a sink (position <
    sinks) alone: the form the fused CPU kernel evaluates (``kernel_pieces``; tested against
    ``select`` for every method); None: XLA's blockwise path only."""
    del params
    return None


@functools.lru_cache(maxsize=None)
def load_rule(rule_json):
  """(extension, params) of a ``scores_rule`` JSON string."""
  spec = json.loads(rule_json)
  ext = get(spec.pop("name"))
  if not isinstance(ext, PiecewiseRoPE):
    raise ValueError(f"scores_rule names {ext.name!r}, which is not a piecewise RoPE method")
  return ext, spec


def scores(rule_json, q, k, q_pos, k_pos, rotate):
  """Logits [b, h, sq, sk] (float32) of one block under the rule; ``rotate(x, pos)`` is
  the run's RoPE (frequencies, attention factor). q, k [b, s, h, d] unrotated."""
  ext, params = load_rule(rule_json)
  part = ext.select(params, q_pos[:, None, :, None], k_pos[:, None, None, :])
  qmaps, kmaps, parts = _distinct_maps(ext, params)

  # Each distinct map's rotation once, outside the branches below: inside them XLA:CPU ran
  # a rotation ~3x slower (a Self-Extend decode step's logits over a 16k cache: 58 -> 24 ms
  # a layer; a needle trial's ten candidates 16 -> 7 s).
  qrot, krot = _rotations(q, q_pos, qmaps, rotate), _rotations(k, k_pos, kmaps, rotate)

  def logits_of(chosen):
    out = jnp.float32(NEG_INF)
    for c in chosen:
      i, j = parts[c]
      out = jnp.where(part == c, qk_dot(qrot[i], krot[j]), out)
    return out

  if len(parts) == 1:
    return logits_of([0])
  # A tile whose attended pairs all use one part (all but the tiles where the parts meet,
  # e.g. Self-Extend's near and far tiles) computes that part's logits alone: at 32k about
  # half the q.k work of two parts. The last branch computes every part.
  alone = [jnp.all((part == c) | (part < 0)) for c in range(len(parts))]
  branch = jnp.argmax(jnp.stack(alone + [jnp.array(True)]))
  return jax.lax.switch(branch, [functools.partial(logits_of, [c]) for c in range(len(parts))]
                        + [functools.partial(logits_of, range(len(parts)))])


def kernel_tables(ext, params):
  """(div, sinks, near, sink) of a method's ``kernel_form``: the part of each class, read
  off ``select`` itself at one pair per class (a non-sink key, and a sink key where there
  are sinks), so the kernel's rule cannot drift from the method's definition."""
  div, sinks, classes = ext.kernel_form(params)
  cls = np.arange(classes)
  base = -(-sinks // div) * div  # the first block start at or after the sinks
  def part(q, k):
    with jax.ensure_compile_time_eval():  # constants, also when called under jit
      return np.asarray(ext.select(params, q, k), np.int32).reshape(-1)
  near = part(base + cls * div, np.full(classes, base))
  sink = part(cls * div, np.zeros(classes, np.int64)) if sinks else near
  return div, sinks, near, sink


def kernel_pieces(rule_json, q, k, q_pos, k_pos, rotate):
  """The fused kernel's operands for a rule with a ``kernel_form``, else None: (queries
  [P_q, b, s, h, d], keys [P_k, b, s, h, d], pieces) for ``cpu_attention.piecewise_attention``,
  each distinct position map's rotation computed once over the whole sequence."""
  ext, params = load_rule(rule_json)
  if ext.kernel_form(params) is None:
    return None
  qmaps, kmaps, pairs = _distinct_maps(ext, params)
  queries = jnp.stack(_rotations(q, q_pos, qmaps, rotate))
  keys = jnp.stack(_rotations(k, k_pos, kmaps, rotate))
  part_q, part_k = zip(*pairs)
  return queries, keys, (part_q, part_k, *kernel_tables(ext, params))


def key_views(rule_json, k, k_pos, rotate):
  """The keys k [b, s, kv, d] rotated under each distinct key map of the rule (a tuple, in
  ``_distinct_maps`` order): what a KV cache keeps of each key (``view_scores``)."""
  ext, params = load_rule(rule_json)
  return _rotations(k, k_pos, _distinct_maps(ext, params)[1], rotate)


def view_scores(rule_json, q, views, q_pos, k_pos, rotate):
  """The rule's logits [b, kv, h // kv, sq, t] of a decode step's queries q [b, sq, h, d]
  (unrotated) over cached key views ([b * kv, t, d] each, from ``key_views``) at positions
  k_pos [b, t]: only the step's queries are rotated, never the cache (a Self-Extend step over
  a 16k cache rotated its 16k keys twice per layer: benchmarks/README.md, "Decoding")."""
  ext, params = load_rule(rule_json)
  qmaps, _, pairs = _distinct_maps(ext, params)
  queries = _rotations(q, q_pos, qmaps, rotate)
  part = ext.select(params, q_pos[:, None, None, :, None], k_pos[:, None, None, None, :])
  out = jnp.float32(NEG_INF)
  for c, (i, j) in enumerate(pairs):
    out = jnp.where(part == c, grouped_qk(queries[i], views[j]), out)
  return out


def _rotations(x, pos, maps, rotate):
  """x [b, s, h, d] rotated at each map of its positions [b, s] (a tuple, in ``maps`` order)."""
  return tuple(rotate(x, fn(pos)) for fn in maps)


def _distinct_maps(ext, params):
  """(query maps, key maps, pairs): each distinct position map of the rule's parts once, and
  each part's (query map index, key map index)."""
  qmaps, kmaps = [], []
  pairs = [(_index(qmaps, qm), _index(kmaps, km)) for qm, km in ext.parts(params)]
  return qmaps, kmaps, pairs


def _index(maps, fn):
  """fn's index in maps (a list of distinct position maps), appended if new."""
  if fn not in maps:
    maps.append(fn)
  return maps.index(fn)


def has_kernel_form(rule_json):
  """Whether the rule's method declares a ``kernel_form`` (runs in the fused CPU kernel)."""
  ext, params = load_rule(rule_json)
  return ext.kernel_form(params) is not None


def tile_attended(rule_json, q_pos, k_pos):
  """Whether any pair of a tile (positions [b, bq], [b, bk]) is attended under the rule (a
  traced bool), or None for a rule that masks nothing beyond causal (``masks``)."""
  ext, params = load_rule(rule_json)
  if not ext.masks:
    return None
  return jnp.any(ext.select(params, q_pos[:, None, :, None], k_pos[:, None, None, :]) >= 0)


def positive_int(params, key, default, minimum=1):
  """params[key] (or ``default``) as an int >= minimum; ValueError naming the key."""
  value = params.get(key, default)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
      or value < minimum:
    raise ValueError(f"variant parameter {key}={value!r} must be an integer >= {minimum}")
  return int(value)


def relative_positions(rule_json, q_pos, k_pos):
  """The relative position f_c(q_i) - g_c(k_j) each pair is scored at ([b, 1, sq, sk]),
  and whether it is attended: the defining matrix of a method (tests, docs)."""
  ext, params = load_rule(rule_json)
  part = ext.select(params, q_pos[:, None, :, None], k_pos[:, None, None, :])
  rel = jnp.zeros(part.shape, jnp.int32)
  for c, (qmap, kmap) in enumerate(ext.parts(params)):
    pair = qmap(q_pos)[:, None, :, None] - kmap(k_pos)[:, None, None, :]
    rel = jnp.where(part == c, pair, rel)
  return rel, part >= 0
