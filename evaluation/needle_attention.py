"""Where the query that answers a needle looks: its attention on the key and on far keys.

    python -m evaluation.needle_attention --runs=runs/needle_longwarm/seeds/t5_bias-s1,runs/needle_longwarm/alibi-s1 \
        --lengths=x1,x4 --depth=1 --trials=20 --out=results/needle_longwarm/seeds

Why: with an induction head T5 loses even the needle nearest the question at 4L while
ALiBi keeps it (results/needle_longwarm/README.md, section 4). The reading to test: T5's
bias is the same for every key past ``max_distance`` (one bucket), so the many far keys of a
long prompt keep their weight and dilute the head that copies, while ALiBi's penalty grows
with distance. Measured on the needle grid's own prompts (``needle.trial_example``): for the
query that predicts the key's first token (the question's last token), per layer and head,
the attention weight on the needle's key tokens and the total weight on keys more than
``far`` positions back (default: the run's training length), averaged over trials, and the
strongest key head's weight in each trial; for the last layer's strongest head (the copy
head), ``copy_head_digits``: the weight the query predicting each answer token puts on each
key token (the true answer before it, as the grid scores), whose diagonal is copying the
right digit. ``--variant`` measures a context-extension variant
set up per length as the grid sets it; ``--grid`` (the grid's needle.jsonl) puts each cell's
exact trials beside that weight in ``--out/needle_attention.md``:

    python -m evaluation.needle_attention --runs=runs/needle_longwarm/rope-s0 --variant=yarn \
        --lengths=x2,x4,x8 --depth=0 --out=results/needle_longwarm/seeds/yarn_attention \
        --grid=results/needle_longwarm/seeds/needle.jsonl
"""
import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from evaluation import needle
from evaluation.heads import attention_maps, layer_inputs
from evaluation.results import ResultsFile, read_rows
from evaluation.runner import one_variant
from input_pipeline.codec import Codec
from training import checkpoint


def answer_query_attention(model, example, far):
  """{"key", "far"}: [layers, h] weight the query predicting the key's first token puts on
  the key's tokens and on keys more than ``far`` positions before it; "digits": [layers, h,
  k, k], row j = the weight the query predicting answer token j (the true answer before it,
  teacher-forced as the grid scores) puts on each key token: an induction head copying
  token j reads key token j, so a head on the key span that reads the wrong token shows
  off the diagonal."""
  n, start, k = example["answer_at"], needle.key_start(example), example["candidates"].shape[1]
  total = n + k - 1  # causal: the first query's row is the same as over the prompt alone
  maps = attention_maps(model, jnp.asarray(example["tokens"][None, :total]),
                        jnp.arange(total, dtype=jnp.int32)[None])
  rows = np.stack([np.asarray(m[0, :, n - 1:total, :]) for m in maps])  # [layers, h, k, total]
  first = rows[:, :, 0]
  return {"key": first[..., start:start + k].sum(-1),
          "far": first[..., :max(n - 1 - far, 0)].sum(-1),
          "digits": rows[..., start:start + k]}


def _rotary_pairs(model):
  """The number of rotary pairs of a plain rotary encoding (ValueError for any other)."""
  enc = model.posenc
  if not hasattr(enc, "inv_freq") or getattr(enc, "scores_rule", ""):
    raise ValueError(f"rotary pairs need a plain rotary encoding, not {type(enc).__name__}")
  return len(enc.inv_freq)


def pair_margins(model, example, layer, head, offset=0):
  """[r / 2] per rotary pair i (i and i + r/2, rotate-half layout): the answer query's logit
  on the key's first token minus its attention-weighted mean logit over all keys, from that
  pair alone. Summed over the pairs (and any unrotated dims) it is s_key - E_p[s], by which
  the softmax ranks the key; split, it says which frequencies carry the head's match.
  ``offset``: the prompt's first position (0 in the grid)."""
  enc, half = model.posenc, _rotary_pairs(model)
  n = example["answer_at"]
  tokens = jnp.asarray(example["tokens"][None, :n])
  positions = offset + jnp.arange(n, dtype=jnp.int32)[None]
  block, x = next(itertools.islice(layer_inputs(model, tokens, positions), layer, None))
  q, k, _ = block.attn.prepare(*block.attn.project(block.attn_norm(x)), positions, positions,
                               enc)
  prod = (q[0, n - 1, head].astype(jnp.float32) * k[0, :, head].astype(jnp.float32))  # [n, d]
  pairs = prod[:, :half] + prod[:, half:2 * half]
  probs = jax.nn.softmax(prod.sum(-1))  # the last query sees every key
  return np.asarray(pairs[needle.key_start(example)] - probs @ pairs)


def ablate_query_pairs(model, layer, head, pairs):
  """Zeroes the query's rotary pairs ``pairs`` (i and i + r/2 each) of one head in one layer
  (0-based), in place: the columns of the fused QKV projection that make them, so the head
  scores keys on its other pairs alone (the rotation mixes only within a pair)."""
  half = _rotary_pairs(model)
  if not (0 <= layer < len(model.blocks)) or not pairs or min(pairs) < 0 or max(pairs) >= half:
    raise ValueError(f"layer {layer + 1} / pairs {pairs}: the model has layers 1-"
                     f"{len(model.blocks)} and rotary pairs 0-{half - 1}")
  attn = model.blocks[layer].attn
  if not 0 <= head < attn.num_heads:
    raise ValueError(f"head {head}: the model has heads 0-{attn.num_heads - 1}")
  cols = np.array([head * attn.head_dim + d for i in pairs for d in (i, i + half)])
  attn.qkv.kernel[...] = attn.qkv.kernel[...].at[:, cols].set(0)
  return model


def parse_ablation(spec):
  """"layer:head:first-last" (layer from 1, as the tables print it; head and pairs from 0)
  -> (layer index, head, pairs)."""
  try:
    layer, head, span = spec.split(":")
    first, last = (int(v) for v in span.split("-"))
    return int(layer) - 1, int(head), list(range(first, last + 1))
  except ValueError:
    raise ValueError(f"--ablate takes layer:head:first-last (e.g. 2:1:1-5), got {spec!r}")


def cell_row(run, model, filler, encode, length, depth, trials, far, seed=0, variant="none",
             pairs=False):
  """Means over the cell's trials, per layer and head, the strongest key head per layer, and
  that head's weight on the key in each trial (``trial_key``, to set beside the grid's
  ``trial_exact`` for the same prompts); with ``pairs``, the last layer's strongest head's
  ``pair_margins`` averaged over the trials, beside the frequencies they were rotated at."""
  examples = [needle.trial_example(filler, encode, length, depth, seed, t)
              for t in range(trials)]
  got = [answer_query_attention(model, e, far) for e in examples]
  key, far_w = (np.mean([g[k] for g in got], axis=0) for k in ("key", "far"))
  best = key.argmax(axis=1)
  last = len(best) - 1  # the copy head: the last layer's strongest key head
  digits = np.mean([g["digits"][last, best[last]] for g in got], axis=0)
  row = {"run": run, "variant": variant, "length": length, "depth": depth, "trials": trials,
         "far": far, "seed": seed, "key": np.round(key, 4).tolist(),
         "copy_head_digits": np.round(digits, 4).tolist(),
         "far_weight": np.round(far_w, 4).tolist(), "best_head": best.tolist(),
         "best_key": [round(float(key[l, h]), 4) for l, h in enumerate(best)],
         "best_far": [round(float(far_w[l, h]), 4) for l, h in enumerate(best)],
         "trial_key": [[round(float(g["key"][l, h]), 4) for g in got]
                       for l, h in enumerate(best)]}
  if pairs:
    margins = np.mean([pair_margins(model, e, last, int(best[last])) for e in examples], axis=0)
    row.update(pair_margin=np.round(margins, 4).tolist(),
               inv_freq=[float(f) for f in model.posenc.inv_freq])
  return row


def _run_key(run_dir):
  """A run directory's last two components: the grid and this tool may have been given the
  same run by relative and absolute paths (and two studies reuse basenames)."""
  return tuple(os.path.normpath(run_dir).split(os.sep)[-2:])


def by_outcome(row, grid_row):
  """The last layer's strongest key head on the trials the grid scored exact and missed:
  {"exact": n, "key_exact": mean weight or None, "key_missed": ...} (same prompts: trial t
  of both is ``needle.trial_example(..., t)``)."""
  exact = np.asarray(grid_row["trial_exact"][:row["trials"]], bool)
  if len(exact) != row["trials"]:
    raise ValueError(f"the grid row has {len(exact)} trials, the attention row {row['trials']}")
  weight = np.asarray(row["trial_key"][-1])
  mean = lambda w: round(float(w.mean()), 4) if len(w) else None
  return {"exact": int(exact.sum()), "key_exact": mean(weight[exact]),
          "key_missed": mean(weight[~exact])}


def outcome_table(rows, grid_rows):
  """Markdown: per attention row with a grid cell on the same prompts, the grid's exact count
  beside the copy head's weight on the key, over all trials and split by outcome. An ablated
  row (``--ablate``) is set beside its own scoring, the grid never saw that model."""
  grid = {(_run_key(g["run_dir"]), g["variant"], g["length"], g["depth"], g["seed"]): g
          for g in sorted(grid_rows, key=lambda g: g.get("trials", 0))  # the largest wins
          if g.get("status") == "ok" and "trial_exact" in g}
  lines = ["| run | variant | ablated | length | depth | exact | head (layer, head) | "
           "key weight | on exact trials | on missed trials |", "|---" * 10 + "|"]
  for r in rows:
    g = r if r.get("ablate") else grid.get((_run_key(r.get("run_dir", r["run"])),
                                             r.get("variant", "none"), r["length"], r["depth"],
                                             r["seed"]))
    if g is None or "trial_key" not in r:
      continue
    o = by_outcome(r, g)
    run = "/".join(_run_key(r["run_dir"]))
    lines.append(f"| {run} | {r['variant']} | {r.get('ablate') or '-'} | {r['length']} | "
                 f"{r['depth']} | {o['exact']} / {r['trials']} | ({len(r['best_head'])}, "
                 f"{r['best_head'][-1]}) | {r['best_key'][-1]:.3f} | {o['key_exact']} | "
                 f"{o['key_missed']} |")
  return "\n".join(lines) + "\n"


KEY_FIELDS = ("run_dir", "run", "variant", "ablate", "length", "depth", "trials", "far", "seed")


def save_row(out, row):
  """Into ``out``/needle_attention.jsonl; a cell measured again replaces its row."""
  os.makedirs(out, exist_ok=True)
  ResultsFile(os.path.join(out, "needle_attention.jsonl"), KEY_FIELDS).add(row)


FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not FLAGS.runs and not FLAGS.grid:
    raise app.UsageError("give --runs (run directories to measure) or --grid (a table only)")
  if FLAGS.grid and not FLAGS.out:
    raise app.UsageError("--grid writes its table into --out: give --out")
  ablation = parse_ablation(FLAGS.ablate) if FLAGS.ablate else None
  for workdir in filter(None, FLAGS.runs.split(",")):
    config, model = checkpoint.load_run(workdir)
    codec = Codec(config)
    filler = needle.filler_tokens(config, codec, FLAGS.split)
    run = os.path.basename(workdir.rstrip("/"))
    for length in needle.run_lengths(FLAGS.lengths, workdir, config.train_len):
      _, scaled = one_variant(config, model, FLAGS.variant, length)
      if ablation:
        ablate_query_pairs(scaled, *ablation)
      row = cell_row(run, scaled, filler, codec.encode, length, FLAGS.depth, FLAGS.trials,
                     FLAGS.far or config.train_len, FLAGS.seed, FLAGS.variant, FLAGS.pairs)
      if ablation:  # the grid never saw this model: score its retrieval here, same prompts
        row.update(ablate=FLAGS.ablate, **needle.evaluate_cell(
            scaled, filler, codec.encode, length, FLAGS.depth, FLAGS.trials, FLAGS.seed))
      row["run_dir"] = workdir  # runs of one basename in two studies stay apart
      if FLAGS.out:
        save_row(FLAGS.out, row)
      digits = np.asarray(row["copy_head_digits"])
      print(json.dumps({**{k: row[k] for k in ("run", "variant", "length", "depth", "best_head",
                                               "best_key", "best_far")},
                        "own_digit": np.round(np.diag(digits), 3).tolist(),
                        "key_span": np.round(digits.sum(-1), 3).tolist()}), flush=True)
  if FLAGS.grid:
    grids = FLAGS.grid.split(",")
    table = outcome_table(read_rows(os.path.join(FLAGS.out, "needle_attention.jsonl")),
                          [g for path in grids for g in read_rows(path)])
    with open(os.path.join(FLAGS.out, "needle_attention.md"), "w") as f:
      f.write(f"# The answer query's copy head beside the grid's outcomes "
              f"({', '.join(grids)})\n\n" + table)


if __name__ == "__main__":
  flags.DEFINE_string("runs", "", "Comma list of run directories (none: only --grid's table).")
  flags.DEFINE_string("lengths", "x1,x4", "Token counts or xF (F x train_len).")
  flags.DEFINE_float("depth", 1.0, "Needle depth (0 = the prompt's start, 1 = by the question).")
  flags.DEFINE_integer("trials", 20, "Examples per length (the needle grid's trials 0..n-1).")
  flags.DEFINE_integer("far", 0, "Keys more than this far back count as far; 0 = train_len.")
  flags.DEFINE_integer("seed", 0, "The needle grid's seed.")
  flags.DEFINE_string("variant", "none", "One variant, as eval_needle.py --variants (yarn, ...), "
                      "set up per length as the grid does.")
  flags.DEFINE_bool("pairs", False, "Also the last layer's copy head's logit margin for the "
                    "key per rotary frequency pair (rotary encodings).")
  flags.DEFINE_string("ablate", "", "layer:head:first-last: zero those query pairs of that "
                      "head (layer from 1) and score the needle with the ablated model too.")
  flags.DEFINE_string("split", "test", "Split whose books give the filler.")
  flags.DEFINE_string("out", "", "Directory for needle_attention.jsonl (a cell measured again "
                      "replaces its row).")
  flags.DEFINE_string("grid", "", "needle.jsonl files (comma list) scored on the same prompts: "
                      "--out gets needle_attention.md, the key weight by trial outcome.")
  app.run(main)
