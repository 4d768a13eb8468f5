"""results.jsonl: one JSON row per (run, variant, length, mode, stride, split, max_tokens).

Writes are atomic: the whole file is rewritten to ``results.jsonl.tmp`` and renamed
over the old one (``os.replace`` is atomic on POSIX), so a kill at any moment leaves
either the old or the new file, never a half-written one. Reading still skips a
malformed line (with a warning) in case a file was produced by other means.

Several processes may write one file (two grids sharing an --out, one per core): each
write takes an exclusive lock on the file's directory and merges the rows on disk before
rewriting, so no process drops rows another wrote since it started (before, the last
writer's rows replaced the file: 2026-12-05, two needle grids into one directory).
"""
import contextlib
import fcntl
import json
import math
import os
import sys

KEY_FIELDS = ("run_dir", "variant", "length", "mode", "stride", "split", "max_tokens",
              "segment_len", "eval_dtype")  # eval_dtype: only in rows of a --dtype override


def row_key(row, key_fields=KEY_FIELDS):
  return tuple(row.get(k) for k in key_fields)


def _clean(value):
  """JSON-safe: NaN / inf become null (strict JSON readers reject them)."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  return value


def read_rows(path):
  """Rows of a results.jsonl ([] if absent); malformed lines are skipped with a warning."""
  if not os.path.exists(path):
    return []
  rows = []
  with open(path) as f:
    for i, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        print(f"warning: {path}:{i} is not valid JSON (partial write?); ignored", file=sys.stderr)
  return rows


@contextlib.contextmanager
def directory_lock(path):
  """Exclusive flock on the directory holding ``path`` (no lock file left among results)."""
  fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)  # closing the descriptor releases the lock


def write_atomic(path, text):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def append_row(path, row):
  """Appends one row to a log that grows a line per event (no rewrite: cheap however long
  it gets). A kill mid-line leaves one malformed line, which ``read_rows`` skips; the
  newline written first if the file does not end with one keeps the next row whole."""
  with open(path, "ab+") as f:
    torn = False
    if f.seek(0, os.SEEK_END) > 0:
      f.seek(-1, os.SEEK_END)
      torn = f.read(1) != b"\n"
    f.write((("\n" if torn else "") + json.dumps(_clean(row), sort_keys=True) + "\n").encode())
    f.flush()
    os.fsync(f.fileno())


class ResultsFile:
  """The rows of one results file, keyed for resumption (by ``key_fields``: a sweep's
  KEY_FIELDS by default; the needle grid passes its own)."""

  def __init__(self, path, key_fields=KEY_FIELDS):
    self.path, self.key_fields = path, key_fields
    self.rows = {}
    for row in read_rows(path):
      self.rows[self.key(row)] = row  # a duplicate key keeps the last row

  def key(self, row):
    return row_key(row, self.key_fields)

  def __contains__(self, key):
    return key in self.rows

  def add(self, row):
    """Writes row (replacing one with its key) together with every row now on disk:
    the file is the union of what every writer added, each key's latest row."""
    with directory_lock(self.path):
      for r in read_rows(self.path):
        self.rows[self.key(r)] = r
      self.rows[self.key(row)] = _clean(row)
      write_atomic(self.path, "".join(json.dumps(r, sort_keys=True) + "\n"
                                      for r in self.rows.values()))


def group_of(row):
  """A row's run group (seeds of one experiment share it; older rows: the run name)."""
  return row.get("group") or row["run"]


def distinct_run_names(rows):
  """``rows`` with each ``run`` name unique per ``run_dir``: a name that two run dirs share
  (``a/rope-s1``, ``b/rope-s1``) gets as many trailing path parts as tell them apart, so
  a report never pools two runs into one cell; names already unique are kept."""
  parts = {}
  for r in rows:
    if r.get("run_dir"):
      parts.setdefault(r["run"], {})[r["run_dir"]] = os.path.normpath(r["run_dir"]).split(os.sep)
  label = {}
  for name, dirs in parts.items():
    longest = max(map(len, dirs.values()))
    depth = next((d for d in range(1, longest) if len({tuple(p[-d:]) for p in dirs.values()})
                  == len(dirs)), longest)
    for run_dir, p in dirs.items():
      label[run_dir] = name if depth == 1 else "/".join(p[-depth:])
  return [{**r, "run": label[r["run_dir"]]} if r.get("run_dir") in label else r for r in rows]


def line_label(row):
  """Run group + variant."""
  group = group_of(row)
  return group if row["variant"] == "none" else f"{group} +{row['variant']}"


def ok_rows(rows):
  return [r for r in rows if r.get("status") == "ok" and r.get("nll") is not None]


def at_train_len(by_len, train_len):
  """The row at the training length, or the longest length below it (None if none)."""
  below = [n for n in by_len if n <= train_len]
  return by_len[max(below)] if below else None
