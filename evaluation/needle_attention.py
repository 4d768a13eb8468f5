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
``far`` positions back (default: the run's training length), averaged over trials.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from evaluation import needle
from evaluation.heads import attention_maps
from evaluation.results import append_row
from input_pipeline.codec import Codec
from training import checkpoint


def answer_query_attention(model, example, far):
  """{"key", "far"}: [layers, h] weight the query predicting the key's first token puts on
  the key's tokens and on keys more than ``far`` positions before it."""
  n = example["answer_at"]
  maps = attention_maps(model, jnp.asarray(example["tokens"][None, :n]),
                        jnp.arange(n, dtype=jnp.int32)[None])
  rows = np.stack([np.asarray(m[0, :, n - 1, :]) for m in maps])  # [layers, h, n]
  start, k = needle.key_start(example), example["candidates"].shape[1]
  return {"key": rows[..., start:start + k].sum(-1), "far": rows[..., :max(n - 1 - far, 0)].sum(-1)}


def cell_row(run, model, filler, encode, length, depth, trials, far, seed=0):
  """Means over the cell's trials, per layer and head, and the strongest key head per layer."""
  got = [answer_query_attention(model, needle.trial_example(filler, encode, length, depth,
                                                              seed, t), far)
         for t in range(trials)]
  key, far_w = (np.mean([g[k] for g in got], axis=0) for k in ("key", "far"))
  best = key.argmax(axis=1)
  return {"run": run, "length": length, "depth": depth, "trials": trials, "far": far,
          "seed": seed, "key": np.round(key, 4).tolist(), "far_weight": np.round(far_w, 4).tolist(),
          "best_head": best.tolist(),
          "best_key": [round(float(key[l, h]), 4) for l, h in enumerate(best)],
          "best_far": [round(float(far_w[l, h]), 4) for l, h in enumerate(best)]}


FLAGS = flags.FLAGS


def main(argv):
  del argv
  for workdir in FLAGS.runs.split(","):
    config, model = checkpoint.load_run(workdir)
    codec = Codec(config)
    filler = needle.filler_tokens(config, codec, FLAGS.split)
    run = os.path.basename(workdir.rstrip("/"))
    for length in needle.parse_lengths(FLAGS.lengths, config.train_len):
      row = cell_row(run, model, filler, codec.encode, length, FLAGS.depth, FLAGS.trials,
                     FLAGS.far or config.train_len, FLAGS.seed)
      if FLAGS.out:
        os.makedirs(FLAGS.out, exist_ok=True)
        append_row(os.path.join(FLAGS.out, "needle_attention.jsonl"), row)
      print(json.dumps({k: row[k] for k in ("run", "length", "depth", "best_head", "best_key",
                                            "best_far")}), flush=True)


if __name__ == "__main__":
  flags.DEFINE_string("runs", None, "Comma list of run directories.")
  flags.DEFINE_string("lengths", "x1,x4", "Token counts or xF (F x train_len).")
  flags.DEFINE_float("depth", 1.0, "Needle depth (0 = the prompt's start, 1 = by the question).")
  flags.DEFINE_integer("trials", 20, "Examples per length (the needle grid's trials 0..n-1).")
  flags.DEFINE_integer("far", 0, "Keys more than this far back count as far; 0 = train_len.")
  flags.DEFINE_integer("seed", 0, "The needle grid's seed.")
  flags.DEFINE_string("split", "test", "Split whose books give the filler.")
  flags.DEFINE_string("out", "", "Directory for needle_attention.jsonl (appended).")
  flags.mark_flag_as_required("runs")
  app.run(main)
