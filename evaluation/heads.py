"""Per-head attention patterns: previous-token, induction and self scores.

    python -m evaluation.heads --runs=runs/rope-s0,runs/alibi-s0 --out=results/needle_demo

Why: in the needle study (results/needle_demo/README.md) only RoPE learnt to retrieve; the
other byte families never formed the induction head that copies the key. The hypothesis
written there: an induction head needs a *previous-token head* in an earlier layer
(attention preferring the key at distance 1 by position alone; Olsson et al. 2022, "In-
context learning and induction heads", sec. 2 and the two-layer circuit of Elhage et al.
2021), and RoPE can express "one back" as a rotation while ALiBi's bias peaks at distance 0
and absolute families must learn it per position. These scores measure it on a trained run:

- previous-token score of a head: mean attention weight of query i on key i - 1, over book
  windows (1 = a pure previous-token head; a uniform head gives ~ln(s)/s);
- induction score: on the same windows with a span of random letters/digits written twice
  (as in training), the mean weight a query in the second copy gives to the key right
  after the earlier occurrence of its own token (Olsson et al.'s "prefix matching" score);
- self score: mean weight on the query's own position (distance 0);
- copy NLL: the model's loss on the second copy (ln 36 = 3.58 = no copying).

Scores come from the probabilities the model's attention computes
(``Attention.probabilities``: the same logits every attention path forms).
Measured on the needle study's six families at three seeds: results/needle_demo/README.md,
last section (the hypothesis holds for ALiBi and NoPE only).
"""
import json
import os

import jax.numpy as jnp
import numpy as np
from absl import app, flags

import input_pipeline
from input_pipeline.text import KEY_SYMBOLS
from models import build_model
from models.loss import token_nll
from training import checkpoint


def layer_inputs(model, tokens, positions):
  """Yields (block, x) for each block in order: x the residual stream entering it."""
  x = model.embed(tokens, positions)
  for block in model.blocks:
    yield block, x
    x, _ = block(x, positions, model.posenc)


def attention_maps(model, tokens, positions):
  """[one per layer] attention probabilities [b, h, s, s] (float32) of the model on tokens."""
  return [block.attn.probabilities(block.attn_norm(x), positions, model.posenc)
          for block, x in layer_inputs(model, tokens, positions)]


def diagonal_score(probs, distance, first=0, last=None):
  """[h]: mean over batch and queries of the weight each query puts on the key
  ``distance`` back, for keys ``first`` .. ``last`` - 1 (default: all)."""
  diag = jnp.diagonal(probs, offset=-distance, axis1=-2, axis2=-1)[..., first:last]
  return diag.mean(axis=(0, 2))


def repeat_windows(text, span, rng):
  """(windows, first, second): book windows [b, L] with one span of random letters/digits
  written at ``first`` = L/2 - span and again at ``second`` = L - span (how the training
  mixture's repeat windows look: ``input_pipeline.text.repeat_span``; a window of random
  symbols alone is out of that distribution: the needle study's RoPE warm-up run, seed 0,
  copied it at 2.5 nats instead of 0.26)."""
  length = text.shape[1]
  first, second = length // 2 - span, length - span
  if first < 0:
    raise ValueError(f"span {span} does not fit twice in windows of {length} tokens")
  out = np.array(text, np.int32)
  spans = rng.choice(KEY_SYMBOLS, (text.shape[0], span)).astype(np.int32)
  out[:, first:first + span] = out[:, second:] = spans
  return out, first, second


def book_windows(config, length, batch):
  """[batch, length] int32 windows of the run's validation text (the first ``batch``)."""
  task = input_pipeline.get_task(config.data, config.seed)
  rows = next(iter(task.eval_batches("validation", length, batch)))["inputs"]
  return np.asarray(rows, np.int32)


def head_scores(model, text, span, rng):
  """{"previous", "self": [layers, h] on the text windows; "induction": [layers, h] and
  "copy_nll" (mean NLL of the second copy's tokens after its first) on the same windows
  with a span repeated (``repeat_windows``)."""
  repeats, first, second = repeat_windows(text, span, rng)
  pos = lambda t: jnp.broadcast_to(jnp.arange(t.shape[1], dtype=jnp.int32), t.shape)
  text_maps = attention_maps(model, jnp.asarray(text), pos(text))
  rep_maps = attention_maps(model, jnp.asarray(repeats), pos(repeats))
  # query second + j holds span token j (j = 0 .. span - 2); the token after its earlier
  # occurrence is key first + j + 1: distance second - first - 1
  induction = [diagonal_score(p, second - first - 1, first + 1, first + span) for p in rep_maps]
  hidden, _ = model.features(jnp.asarray(repeats[:, :-1]), pos(repeats[:, :-1]))
  nll = token_nll(model, hidden, jnp.asarray(repeats[:, 1:]))[:, second:]  # targets second+1..
  return {"previous": np.stack([diagonal_score(p, 1) for p in text_maps]),
          "self": np.stack([diagonal_score(p, 0) for p in text_maps]),
          "induction": np.stack(induction), "copy_nll": float(jnp.mean(nll))}


def summary_row(run, config, scores):
  """One results row: the strongest head of each kind per layer."""
  best = lambda a: [round(float(x), 4) for x in np.max(a, axis=1)]
  return {"run": run, "posenc": config.posenc.name, "seed": int(config.seed),
          "copy_nll": round(scores["copy_nll"], 4), "previous_max": best(scores["previous"]),
          "induction_max": best(scores["induction"]), "self_max": best(scores["self"]),
          "previous": np.round(scores["previous"], 4).tolist(),
          "induction": np.round(scores["induction"], 4).tolist()}


def markdown(rows):
  head = ("| run | posenc | seed | copy NLL (ln 36 = 3.58) | previous-token max per layer | "
          "induction max per layer | self max per layer |\n|---|---|---|---|---|---|---|")
  fmt = lambda xs: " / ".join(f"{x:.2f}" for x in xs)
  return "\n".join([head] + [
      f"| {r['run']} | {r['posenc']} | {r['seed']} | {r['copy_nll']:.2f} | "
      f"{fmt(r['previous_max'])} | {fmt(r['induction_max'])} | {fmt(r['self_max'])} |"
      for r in rows])


FLAGS = flags.FLAGS


def main(argv):
  del argv
  rows = []
  os.makedirs(FLAGS.out, exist_ok=True)
  for workdir in FLAGS.runs.split(","):
    config, model = checkpoint.load_run(workdir)
    if FLAGS.at_init:  # the baseline: the run's architecture before training (its seed)
      model = build_model(config)
    text = book_windows(config, FLAGS.length or config.train_len, FLAGS.batch)
    scores = head_scores(model, text, FLAGS.span, np.random.default_rng(FLAGS.seed))
    name = os.path.basename(workdir.rstrip("/")) + ("@init" if FLAGS.at_init else "")
    rows.append(summary_row(name, config, scores))
    with open(os.path.join(FLAGS.out, "heads.jsonl"), "a", encoding="utf-8") as f:
      f.write(json.dumps(rows[-1]) + "\n")  # row by row: a later failure loses nothing
    print(json.dumps({k: rows[-1][k] for k in ("run", "copy_nll", "previous_max",
                                                "induction_max", "self_max")}), flush=True)
  print(markdown(rows))


if __name__ == "__main__":
  flags.DEFINE_string("runs", None, "Comma list of run directories.")
  flags.DEFINE_string("out", "results/heads", "Directory for heads.jsonl (appended).")
  flags.DEFINE_integer("length", 0, "Window length; 0 = each run's training length.")
  flags.DEFINE_integer("span", 32, "Repeated span length (induction score, copy NLL).")
  flags.DEFINE_integer("batch", 32, "Windows of each kind.")
  flags.DEFINE_integer("seed", 0, "Seed of the random spans.")
  flags.DEFINE_bool("at_init", False, "Score each run's untrained model (its config and seed).")
  flags.mark_flag_as_required("runs")
  app.run(main)
