"""Results files shared by several writers (evaluation/results.py ResultsFile)."""
import os
import subprocess
import sys

from evaluation import results

KEYS = ("run", "length")


def test_a_writer_keeps_rows_another_wrote_after_it_opened_the_file(tmp_path):
  # Two grids into one --out: each opened the file before the other's first row.
  path = str(tmp_path / "needle.jsonl")
  first, second = results.ResultsFile(path, KEYS), results.ResultsFile(path, KEYS)
  first.add({"run": "a", "length": 64, "accuracy": 1.0})
  second.add({"run": "b", "length": 64, "accuracy": 0.5})
  first.add({"run": "a", "length": 128, "accuracy": 0.9})
  rows = {results.row_key(r, KEYS): r["accuracy"] for r in results.read_rows(path)}
  assert rows == {("a", 64): 1.0, ("b", 64): 0.5, ("a", 128): 0.9}
  # A key written again keeps its latest row, whoever wrote it.
  second.add({"run": "a", "length": 64, "accuracy": 0.25})
  assert results.ResultsFile(path, KEYS).rows[("a", 64)]["accuracy"] == 0.25


WRITER = """
import sys
from evaluation import results
store = results.ResultsFile(sys.argv[1], ("run", "length"))
for n in range(40):
  store.add({"run": sys.argv[2], "length": n})
"""


def test_concurrent_writers_lose_no_row(tmp_path):
  path = str(tmp_path / "results.jsonl")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  procs = [subprocess.Popen([sys.executable, "-c", WRITER, path, name], cwd=root)
           for name in "abc"]
  assert all(p.wait(timeout=120) == 0 for p in procs)
  rows = results.read_rows(path)
  assert len(rows) == 120
  assert {(r["run"], r["length"]) for r in rows} == {(w, n) for w in "abc" for n in range(40)}
  assert not (tmp_path / "results.jsonl.tmp").exists()
