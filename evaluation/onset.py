"""When does a run's induction head form? Read from its logged train loss.

    python -m evaluation.onset --runs=runs/needle_longwarm/rope_24000-s0,runs/needle_longwarm/alibi_24000-s0 \
        --marks=2000,4000,8000,12000,24000 --out=results/needle_longwarm

Why: on repeat windows (``data.repeat_warmup_steps``: a span of random symbols written twice,
``input_pipeline.text.repeat_span``) the train loss sits on a plateau (~2.9 nats per byte for
the demo's byte model) until an induction head forms, then drops within a few hundred steps
to the copying level (~2.0): the sudden onset Olsson et al. (2022, "In-context learning and
induction heads", sec. 3) describe. The step of that drop is the quantity compared across
families and seeds in results/needle_longwarm/README.md, so it is computed here, not read off
a plot:

- trailing mean at step s: the mean of the logged losses at steps in (s - window, s];
- onset: the first logged step whose ``onset_window`` trailing mean falls below
  ``threshold`` after having been at or above it, or None when it never does (a run that
  falls straight from its initial loss to below the threshold gets the step it crosses).

The threshold is a fixed number of nats chosen between the two levels (default 2.5, between
the demo recipe's ~2.9 plateau and ~2.0 copying level); it is an input, not fitted per run.
A resumed run logs again the steps after its last checkpoint: the last row logged for a step
is kept (the one on the trajectory the final parameters came from).
"""
import os

import numpy as np
from absl import app, flags

from evaluation.results import ResultsFile, read_rows


def loss_curve(workdir, key="train/loss"):
  """(steps, values) of ``key`` in workdir/metrics.jsonl, one per step (the last logged),
  sorted by step."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no metrics.jsonl (is {workdir!r} a training run directory?)")
  by_step = {}
  for row in read_rows(path):  # a run killed mid-write leaves a torn last line: skipped
    if key in row:
      by_step[int(row["step"])] = float(row[key])
  if not by_step:
    raise ValueError(f"{path} logs no {key!r}")
  steps = np.array(sorted(by_step))
  return steps, np.array([by_step[s] for s in steps])


def trailing_mean(steps, values, at, window):
  """Mean of the values logged at steps in (at - window, at]; nan when there are none."""
  inside = (steps > at - window) & (steps <= at)
  return float(values[inside].mean()) if inside.any() else float("nan")


def onset_step(steps, values, window, threshold):
  """First logged step whose trailing mean drops below threshold from at or above it."""
  above = False
  for s in steps:
    mean = trailing_mean(steps, values, s, window)
    if mean >= threshold:
      above = True
    elif above:
      return int(s)
  return None


def onset_row(workdir, marks, window, onset_window, threshold):
  """A results row: the trailing means at each mark and the onset step (with the
  ``onset_window`` means ``onset_window`` steps either side of it, to show the drop; the
  later one at the run's last step when the run ends sooner: then the drop may not be
  over, and ``at_end`` says so)."""
  steps, values = loss_curve(workdir)
  onset = onset_step(steps, values, onset_window, threshold)
  row = {"run": os.path.basename(os.path.normpath(workdir)), "window": window,
         "means": {str(m): trailing_mean(steps, values, m, window) for m in marks},
         "onset_window": onset_window, "threshold": threshold, "onset": onset,
         "last_step": int(steps[-1])}
  if onset is not None:
    after = min(onset + onset_window, row["last_step"])
    row["around_onset"] = {str(s): trailing_mean(steps, values, s, onset_window)
                           for s in (onset - onset_window, after)}
    row["at_end"] = after < onset + onset_window
  return row


KEY_FIELDS = ("run", "window", "onset_window", "threshold")  # a rerun replaces its row


def markdown(rows):
  """One line per row; the columns are every mark any row has (blank where a row lacks it)."""
  marks = sorted({m for r in rows for m in r["means"]}, key=int)
  lines = ["| run | " + " | ".join(marks) + " | onset |", "|---" * (len(marks) + 2) + "|"]
  for r in rows:
    onset = (f"not within {r['last_step']}" if r["onset"] is None else
             f"{r['onset']} (" + ", ".join(f"{v:.2f} at {s}" for s, v in r["around_onset"].items())
             + ("; the run ends there" if r.get("at_end") else "") + ")")
    means = [r["means"].get(m) for m in marks]
    lines.append(f"| {r['run']} | " + " | ".join("" if v is None else f"{v:.2f}" for v in means)
                 + f" | {onset} |")
  return "\n".join(lines)


FLAGS = flags.FLAGS


def main(argv):
  del argv
  marks = [int(m) for m in FLAGS.marks.split(",")]
  rows = [onset_row(w, marks, FLAGS.window, FLAGS.onset_window, FLAGS.threshold)
          for w in FLAGS.runs.split(",")]
  table = markdown(rows)
  print(table)
  if FLAGS.out:
    os.makedirs(FLAGS.out, exist_ok=True)
    store = ResultsFile(os.path.join(FLAGS.out, "onset.jsonl"), KEY_FIELDS)
    for r in rows:
      store.add(r)
    with open(os.path.join(FLAGS.out, "onset.md"), "w") as f:
      f.write(markdown(list(store.rows.values())) + "\n")


if __name__ == "__main__":
  flags.DEFINE_string("runs", None, "Comma list of run directories.")
  flags.DEFINE_string("marks", "2000,4000,8000,12000,16000,24000",
                      "Steps at which to report the trailing mean loss.")
  flags.DEFINE_integer("window", 500, "Steps averaged at each mark.")
  flags.DEFINE_integer("onset_window", 200, "Steps averaged when locating the drop.")
  flags.DEFINE_float("threshold", 2.5, "Loss (nats) the onset window's mean falls below.")
  flags.DEFINE_string("out", "", "Directory for onset.jsonl (a run measured again replaces its "
                      "row) and onset.md (every row); empty = print only.")
  flags.mark_flag_as_required("runs")
  app.run(main)
