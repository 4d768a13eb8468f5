"""Needle retrieval on real text: a pass key hidden at a chosen depth of book text.

The passkey test of Mohtashami & Jaggi 2023 (arXiv 2305.16300, sec. 4.1; used by the PI and
YaRN papers) with the needle-in-a-haystack layout (a length x depth grid), but with filler
taken from the books of the evaluated split instead of a repeated sentence (which makes
the test too easy: any copy of the surroundings points at the key):

    [filler[:p]] [NEEDLE(key)] [filler[p:]] [QUESTION] [key]
    p = round(depth * len(filler))            (depth 0 = first, 1 = just before the question)

Scoring is teacher-forced on one forward pass with a KV cache (``models.generate``):
exact match = every answer token is the argmax given the true earlier answer tokens, which
is exactly "greedy decoding of the answer reproduces it" (the first wrong argmax is where
greedy would diverge; tests/test_needle.py checks the equivalence); and the rank of the
true key by total log-probability among ``distractors`` random keys of the same length
(the prefix is computed once; each candidate continues on a branch of its cache).
"""
import math

import numpy as np

import pretrained
from evaluation.results import group_of
from input_pipeline import text as text_data
from models.generate import CachedDecoder

# short, so that it fits half the training length of the byte runs (36 of 64 bytes with the
# key); the question repeats the needle's wording, as in the passkey test
NEEDLE = " The pass key is {key}. "
QUESTION = " The pass key is "
KEY_DIGITS = 5


def wilson_interval(successes, trials, z=1.96):
  """95 % Wilson score interval (Wilson 1927) of a binomial proportion: (lo, hi)."""
  if trials == 0:
    return (0.0, 1.0)
  p = successes / trials
  centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
  half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
  return (max(0.0, centre - half), min(1.0, centre + half))


MAX_FILLER_CHARS = 4_000_000  # BPE filler: tokenise only this much of the split


def _number(item, flag, what):
  try:
    return float(item)
  except ValueError:
    raise ValueError(f"--{flag}: {item!r} is not {what}") from None


# The grids (issue 13): 0.5x-64x the training length for runs trained here, 1k-32k
# tokens for a pretrained checkpoint (whose "training length" is its context, 8k for SmolLM2:
# 64x that would be 512k tokens).
GRID = "grid"
GRID_LENGTHS = {"run": "x0.5,x1,x2,x4,x8,x16,x32,x64",
                "checkpoint": "1024,2048,4096,8192,16384,32768"}


def parse_lengths(spec, train_len, checkpoint=False):
  """--lengths -> token counts: a comma list of counts or xF (F x train_len), or "grid"."""
  if spec.strip() == GRID:
    spec = GRID_LENGTHS["checkpoint" if checkpoint else "run"]
  out = []
  for item in spec.split(","):
    item = item.strip()
    what = f"a token count or xF (F x the training length), e.g. 4096 or x2, or {GRID!r}"
    value = (_number(item[1:], "lengths", what) * train_len if item.startswith("x")
             else _number(item, "lengths", what))
    if value < 1:
      raise ValueError(f"length {item!r} must be >= 1 token (or xF with F > 0)")
    out.append(int(round(value)))
  return out


def run_lengths(spec, run_dir, train_len):
  """``parse_lengths`` for one run: "grid" is the checkpoint grid for a pretrained one."""
  return parse_lengths(spec, train_len, pretrained.is_checkpoint(run_dir))


def parse_depths(spec):
  """--depths -> floats, checked before any run is loaded."""
  out = [_number(d.strip(), "depths", "a depth (a number in [0, 1])") for d in spec.split(",")]
  bad = [d for d in out if not 0.0 <= d <= 1.0]
  if bad:
    raise ValueError(f"--depths must lie in [0, 1] (0 = the start of the text, 1 = just "
                     f"before the question); got {bad}")
  return out


def filler_tokens(config, codec, split):
  """The split's books as token ids: the filler needles are hidden in."""
  docs = text_data.books_docs(split, config.data.get("data_dir", ""),
                              config.data.get("books_dir", ""))
  data = b"".join(bytes(d) for d in docs)
  if not codec.bpe:
    return np.frombuffer(data, np.uint8).astype(np.int32)
  return codec.encode(data[:MAX_FILLER_CHARS].decode("utf-8", errors="ignore"))


def random_key(rng):
  return str(int(rng.integers(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS)))


def make_example(filler, encode, length, depth, rng, distractors=9):
  """One needle sequence of exactly ``length`` tokens.

  filler: the split's token ids (1-D); encode: text -> token ids; depth in [0, 1].
  Returns dict(tokens [length], needle_at, answer_at, candidates [1 + distractors, k]
  with the true key first). Distractor keys differ from the key and encode to as many
  tokens (so candidates compare by total log-probability fairly)."""
  if not 0.0 <= depth <= 1.0:
    raise ValueError(f"depth must be in [0, 1], got {depth}")
  key = random_key(rng)
  needle, question = (np.asarray(encode(t), np.int32) for t in
                      (NEEDLE.format(key=key), QUESTION))
  answer = np.asarray(encode(key), np.int32)
  n_fill, at, answer_at = layout(len(needle), len(question), len(answer), length, depth)
  if n_fill < 0 or n_fill > len(filler):
    raise ValueError(f"length {length} does not fit a needle ({len(needle)} + "
                     f"{len(question)} + {len(answer)} tokens) in {len(filler)} filler tokens")
  start = int(rng.integers(0, len(filler) - n_fill + 1))
  fill = np.asarray(filler[start:start + n_fill], np.int32)
  tokens = np.concatenate([fill[:at], needle, fill[at:], question, answer])
  cands = [answer]
  while len(cands) < 1 + distractors:
    other = random_key(rng)
    ids = np.asarray(encode(other), np.int32)
    if other != key and len(ids) == len(answer) and not any((ids == c).all() for c in cands):
      cands.append(ids)
  return {"tokens": tokens, "needle_at": at, "needle": needle,
          "answer_at": answer_at, "candidates": np.stack(cands)}


def trial_example(filler, encode, length, depth, seed, t, distractors=9):
  """Trial t's example of a (length, depth) cell: it depends only on (seed, length, depth, t),
  so every variant and every analysis of the cell sees the same prompts."""
  rng = np.random.default_rng([seed, length, int(round(depth * 1000)), t])
  return make_example(filler, encode, length, depth, rng, distractors)


def key_start(example):
  """Position of the key's first token inside the prompt (the needle holds it once)."""
  needle, key = example["needle"], example["candidates"][0]
  for i in range(len(needle) - len(key) + 1):
    if (needle[i:i + len(key)] == key).all():
      return example["needle_at"] + i
  raise ValueError("the needle does not contain its key")


def layout(n_needle, n_question, n_answer, length, depth):
  """(filler tokens, needle start, answer start) of a ``length``-token needle sequence."""
  n_fill = length - n_needle - n_question - n_answer
  return n_fill, int(round(depth * n_fill)), length - n_answer


def distance_back(encode, length, depth):
  """Tokens from the needle's start to the answer's first token: how far back the model must
  look, which is what a positional encoding sees (a depth means another distance at every
  length). Counted with a representative key: exact for byte runs and for tokenizers that
  split digits one by one (SmolLM2's), within a token or two for one that merges them."""
  _, at, answer_at = layout(*example_sizes(encode), length, depth)
  return answer_at - at


def example_sizes(encode):
  """Token counts of the needle, the question and the key (a representative key, as
  ``distance_back``); their sum is the shortest example ``make_example`` can build."""
  key = "".join(str(i % 10) for i in range(1, KEY_DIGITS + 1))
  return [len(encode(t)) for t in (NEEDLE.format(key=key), QUESTION, key)]


def log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def score_example(model, example, **cache_kw):
  """(exact match, rank of the true key among the candidates (1 = best), per answer token:
  whether it is the argmax given the true earlier tokens [k] - which digit fails)."""
  tokens, at, cands = example["tokens"], example["answer_at"], example["candidates"]
  dec = CachedDecoder(model, 1, len(tokens), **cache_kw)
  prefix = dec.feed(tokens[None, :at], last_only=True)
  first = log_softmax(np.asarray(prefix)[0, -1])  # P(answer[0] | prefix)
  rest = np.concatenate([log_softmax(np.asarray(dec.peek(c[None, :-1])))
                         for c in cands])  # [c, k-1, V]
  steps = np.concatenate([np.broadcast_to(first, (len(cands), 1, first.shape[-1])), rest], 1)
  correct = steps[0].argmax(-1) == cands[0]
  logp = np.take_along_axis(steps, cands[:, :, None], axis=-1)[..., 0].sum(-1)
  return bool(correct.all()), 1 + int((logp[1:] > logp[0]).sum()), correct


def evaluate_cell(model, filler, encode, length, depth, trials, seed=0, distractors=9,
                  done=None, on_trial=None, first=0):
  """Row fields of one (length, depth) cell: accuracy with its 95 % interval, mean rank,
  the teacher-forced accuracy of each answer token (``token_accuracy``, first to last), and
  each trial's outcome (``trial_exact``, ``trial_rank``): trial t's example depends only on
  (seed, length, depth, t), so two variants' rows of a cell can be compared trial by trial
  (``paired_trials``) and a cell can resume from trials scored before.

  done: {t: outcome} of trials already scored (an interrupted or a smaller cell);
  on_trial(t, outcome) is called after each new trial, so a caller can keep it. An outcome
  is {"exact": 0 | 1, "rank": int, "correct": [bool per answer token]}.
  first: trials below it are left to another process (one cell split across processes, each
  scoring its own range into a shared trial log); None while any of them is not in done."""
  done = dict(done or {})
  for t in range(first, trials):
    if t in done:
      continue
    hit, rank, ok = score_example(model, trial_example(filler, encode, length, depth, seed,
                                                       t, distractors))
    done[t] = {"exact": int(hit), "rank": rank, "correct": [bool(c) for c in ok]}
    if on_trial is not None:
      on_trial(t, done[t])
  if any(t not in done for t in range(trials)):
    return None
  return cell_fields([done[t] for t in range(trials)], distractors)


def cell_fields(outcomes, distractors):
  """A cell's row fields from its trials' outcomes (in trial order)."""
  exact = [o["exact"] for o in outcomes]
  ranks = [o["rank"] for o in outcomes]
  hits, trials = sum(exact), len(outcomes)
  return {"trials": trials, "accuracy": hits / trials, "ci": list(wilson_interval(hits, trials)),
          "mean_rank": float(np.mean(ranks)), "distractors": distractors,
          "token_accuracy": np.mean([o["correct"] for o in outcomes], axis=0).round(4).tolist(),
          "trial_exact": exact, "trial_rank": ranks}


def mcnemar_exact_p(only_a, only_b):
  """Two-sided exact McNemar test (McNemar 1947; the binomial sign test on the discordant
  pairs): P(a split at least this uneven | each discordant trial is a fair coin)."""
  n, k = only_a + only_b, min(only_a, only_b)
  if n == 0:
    return 1.0
  tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
  return min(1.0, 2 * tail)


# the fields that fix a cell's examples (rows equal on these scored the same trials), and
# the matmul dtype, so that a pair differs in its variant only
SAME_EXAMPLES = ("run_dir", "length", "depth", "seed", "trials", "distractors", "split",
                 "eval_dtype")


def paired_trials(rows):
  """Every pair of variants scored on the same examples in one dtype (rows equal on
  SAME_EXAMPLES, both with per-trial outcomes): exact match split into both / only a /
  only b / neither, the exact McNemar p of a vs b, and the trials where each ranks the true
  key first."""
  cells = {}
  for r in rows:
    if r.get("status") == "ok" and "trial_exact" in r:
      cells.setdefault(tuple(r.get(f) for f in SAME_EXAMPLES), []).append(r)
  out = []
  for _, rs in sorted(cells.items(), key=lambda kv: str(kv[0])):
    rs = sorted(rs, key=lambda r: r["variant"])
    for i, a in enumerate(rs):
      for b in rs[i + 1:]:
        ea, eb = np.array(a["trial_exact"], bool), np.array(b["trial_exact"], bool)
        only_a, only_b = int((ea & ~eb).sum()), int((eb & ~ea).sum())
        out.append({"run": a["run"], "length": a["length"], "depth": a["depth"],
                    "trials": len(ea), "a": a["variant"], "b": b["variant"],
                    "both": int((ea & eb).sum()), "only_a": only_a, "only_b": only_b,
                    "neither": int((~ea & ~eb).sum()), "p": mcnemar_exact_p(only_a, only_b),
                    "first_a": int((np.array(a["trial_rank"]) == 1).sum()),
                    "first_b": int((np.array(b["trial_rank"]) == 1).sum()),
                    "examples": tuple(a.get(f) for f in SAME_EXAMPLES
                                      if f not in ("depth", "trials"))})
  return out


PAIR_COUNTS = ("trials", "both", "only_a", "only_b", "neither", "first_a", "first_b")


def paired_over_depths(pairs):
  """``paired_trials``' pairs of one length summed over its depths (where two or more were
  paired): every trial is its own example, drawn with its own seed, so the sign test over
  all discordant trials still counts independent pairs. It answers "which variant retrieves
  more at this length", which one cell's 20 trials rarely settle; ``depths`` lists what
  was summed (a depth scored for one variant only is not in it). A depth paired at two
  trial counts counts once, at the larger (the smaller's trials are its first ones)."""
  groups = {}
  for q in pairs:
    by_depth = groups.setdefault((q["examples"], q["a"], q["b"]), {})
    if q["trials"] > by_depth.get(q["depth"], {"trials": 0})["trials"]:
      by_depth[q["depth"]] = q
  out = []
  for (_, a, b), by_depth in groups.items():
    qs = list(by_depth.values())
    if len(qs) < 2:
      continue
    sums = {f: sum(q[f] for q in qs) for f in PAIR_COUNTS}
    out.append({"run": qs[0]["run"], "length": qs[0]["length"], "a": a, "b": b,
                "depths": sorted(q["depth"] for q in qs), **sums,
                "p": mcnemar_exact_p(sums["only_a"], sums["only_b"])})
  return out


def common_depths(rows):
  """Depths evaluated at every length of ``rows``: a mean over depths compares lengths only
  over these (a depth-0 needle fails where a depth-0.5 one does not)."""
  by_len = {}
  for r in rows:
    by_len.setdefault(r["length"], set()).add(r["depth"])
  return sorted(set.intersection(*by_len.values())) if by_len else []


def _mean_accuracy(rows, length, depths):
  """Accuracy at ``length`` averaged over ``depths``; None if one of them is missing."""
  by_depth = {r["depth"]: r["accuracy"] for r in rows if r["length"] == length}
  return float(np.mean([by_depth[d] for d in depths])) if set(depths) <= set(by_depth) else None


def _bound(rows, train_len, threshold, relative, reference):
  """The accuracy a length must reach: threshold x the accuracy at the training length over
  ``common_depths(rows)`` (read from ``reference`` when ``rows`` have none there) if
  ``relative``, else threshold; None if relative and that accuracy is 0 or unknown."""
  if not relative:
    return threshold
  own = any(r["length"] == train_len for r in rows)
  ref = _mean_accuracy(rows if own else reference, train_len, common_depths(rows))
  return threshold * ref if ref else None


def effective_length(rows, train_len, threshold=0.85, relative=True, reference=()):
  """Longest length n such that at every evaluated length from the start up to n the accuracy
  averaged over ``common_depths(rows)`` reaches ``_bound``. Relative (threshold x the accuracy
  at the training length): counted from the training length up, since the question is
  whether retrieval survives past L (lengths below L: ``short_failures``). Absolute
  (threshold x 1.0): counted from the shortest length, RULER's effective context, which can
  lie below L. None if the first counted length fails or the bound is unknown. reference:
  rows to read the training length's accuracy from when ``rows`` have none there (a variant
  evaluated only past L: the model's own rows, variant none)."""
  bound = _bound(rows, train_len, threshold, relative, reference)
  if bound is None:
    return None
  depths = common_depths(rows)
  best = None
  for n in sorted({r["length"] for r in rows if not relative or r["length"] >= train_len}):
    if _mean_accuracy(rows, n, depths) < bound:
      break
    best = n
  return best


def short_failures(rows, train_len, threshold=0.85, reference=()):
  """Lengths below the training length whose accuracy misses the relative bound: what the
  relative ``effective_length`` does not count (a model trained only on full-window
  examples can fail shorter prompts: results/needle_longwarm/README.md, section 3)."""
  bound = _bound(rows, train_len, threshold, True, reference)
  if bound is None:
    return []
  depths = common_depths(rows)
  return [n for n in sorted({r["length"] for r in rows if r["length"] < train_len})
          if _mean_accuracy(rows, n, depths) < bound]


def across_seeds(rows):
  """{(group, variant): {length: stats}} for run groups evaluated at >= 2 training seeds:
  each seed's accuracy (and mean rank) averaged over depths first, then the mean, sample sd
  (ddof 1), min and max over seeds - training noise, next to each cell's trial interval."""
  per = {}
  for r in rows:
    if r.get("status") == "ok":
      key = (group_of(r), r["variant"])
      per.setdefault(key, {}).setdefault(r["length"], {}).setdefault(r["run_dir"], []).append(r)
  out = {}
  for key, by_len in per.items():
    stats = {}
    for length, by_run in sorted(by_len.items()):
      acc = np.array([np.mean([r["accuracy"] for r in rs]) for rs in by_run.values()])
      rank = np.array([np.mean([r["mean_rank"] for r in rs]) for rs in by_run.values()])
      if len(acc) >= 2:
        stats[length] = {"seeds": len(acc), "accuracy": float(acc.mean()),
                         "accuracy_sd": float(acc.std(ddof=1)), "accuracy_min": float(acc.min()),
                         "accuracy_max": float(acc.max()), "rank": float(rank.mean()),
                         "rank_sd": float(rank.std(ddof=1))}
    if stats:
      out[key] = stats
  return out
