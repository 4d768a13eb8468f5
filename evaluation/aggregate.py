"""Rows of several seeds -> one line: the seed mean, its spread, and the evaluation error.

A *line* is a run group (``config.name``; the run directory's name when unset) under one
variant and evaluation setting; its seeds are the runs of that group. Summary tables and
plots show, per (line, length): the mean over seeds of the perplexity, the sample standard
deviation over seeds (training noise) and the largest per-row standard error of the mean
NLL (evaluation noise, ``evaluation.metrics``). Relative values divide each seed's
perplexity by *that seed's own* value at its training length before averaging.
"""
import collections
import dataclasses

import numpy as np

from evaluation.results import at_train_len, line_label

SETTING_FIELDS = ("mode", "split", "max_tokens", "segment_len")


def setting(row):
  return tuple(row.get(k) for k in SETTING_FIELDS)


def lines(rows):
  """{label: {length: [rows, one per seed]}} in first-seen order (all statuses)."""
  out = collections.OrderedDict()
  settings = {setting(r) for r in rows}
  for r in rows:
    label = line_label(r)
    if len(settings) > 1:
      label += " [" + ", ".join(str(v) for v in setting(r)) + "]"
    out.setdefault(label, {}).setdefault(r["length"], []).append(r)
  return out


def _ok(rs):
  return [r for r in rs if r.get("status") == "ok" and r.get("nll") is not None]


@dataclasses.dataclass
class Cell:
  """Perplexity (or its ratio to train_len) over seeds at one (line, length)."""
  mean: float
  sd: float  # sample sd over seeds (ddof=1); 0 with one seed
  lo: float  # min over seeds
  hi: float  # max over seeds
  seeds: int
  se: float  # largest per-seed standard error of the mean NLL (nats)


def train_len_refs(by_len):
  """{run_dir: that run's row at its training length (or the longest length below)}."""
  per_run = collections.defaultdict(dict)
  for n, rs in by_len.items():
    for r in _ok(rs):
      per_run[r["run_dir"]][n] = r
  refs = {}
  for run_dir, runs_by_len in per_run.items():
    ref = at_train_len(runs_by_len, next(iter(runs_by_len.values()))["train_len"])
    if ref is not None:
      refs[run_dir] = ref
  return refs


def cell(rs, refs=None):
  """Cell of the ok rows ``rs``; with ``refs`` (train_len_refs) each ppl is divided by its
  own run's reference. None if no row qualifies."""
  rs = [r for r in _ok(rs) if refs is None or r["run_dir"] in refs]
  if not rs:
    return None
  vals = np.array([r["ppl"] / (refs[r["run_dir"]]["ppl"] if refs else 1.0) for r in rs])
  ses = [r.get("nll_se") for r in rs if r.get("nll_se") is not None]
  return Cell(mean=float(vals.mean()), sd=float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
              lo=float(vals.min()), hi=float(vals.max()), seeds=len(vals),
              se=float(max(ses)) if ses else float("nan"))


def mean_row(rs):
  """One row averaging the ok rows ``rs`` (numbers and equal-length number lists) over
  seeds, for the diagnostic figures (per-position loss, attention statistics)."""
  rs = _ok(rs)
  if not rs:
    return None
  out = dict(rs[0])
  for key, value in rs[0].items():
    vals = [r.get(key) for r in rs]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and all(
        isinstance(v, (int, float)) for v in vals):
      out[key] = float(np.mean(vals))
    elif isinstance(value, list) and value and all(
        isinstance(v, list) and len(v) == len(value) and all(isinstance(x, (int, float)) for x in v)
        for v in vals):
      out[key] = [float(x) for x in np.mean(np.array(vals, float), axis=0)]
  out["seeds"] = len(rs)
  return out
