"""Metrics to metrics.jsonl and TensorBoard event files; a tqdm progress bar."""
import json
import os
import sys

from tensorboardX import SummaryWriter
from tqdm import tqdm


class MetricWriter:
  """Appends {"step", **scalars} lines to workdir/metrics.jsonl and TensorBoard."""

  def __init__(self, workdir):
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step, scalars):
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)

  def close(self):
    self._jsonl.close()
    self._tb.close()


def progress_bar(start, total, desc):
  """Step progress with ETA; tqdm prints to stderr, mininterval keeps it cheap."""
  return tqdm(total=total, initial=start, desc=desc, unit="step", dynamic_ncols=True,
              mininterval=1.0, file=sys.stderr)
