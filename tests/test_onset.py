"""The induction-onset read-out (evaluation/onset.py): trailing means and the drop step."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from evaluation import onset


def _write_metrics(workdir, rows):
  with open(workdir / "metrics.jsonl", "w") as f:
    for step, loss in rows:
      f.write(json.dumps({"step": step, "train/loss": loss, "train/grad_norm": 1.0}) + "\n")


def _plateau_then_drop(drop_at, last=2000, every=20, noise=0.02, seed=0):
  """A warm-up's curve: 5.5 falling to a 2.9 plateau by step 200, 2.0 from step drop_at on."""
  rng = np.random.default_rng(seed)
  rows = []
  for s in range(every, last + 1, every):
    level = 5.5 - 2.6 * s / 200 if s < 200 else (2.9 if s < drop_at else 2.0)
    rows.append((s, level + noise * rng.standard_normal()))
  return rows


def test_onset_is_where_the_trailing_mean_crosses(tmp_path):
  # Loss 2.0 from step 1000 on, a 200-step window (10 logged steps): the mean of (780, 980]
  # is 2.9, of (800, 1000] 0.9 x 2.9 + 0.1 x 2.0 = 2.81; it falls below 2.5 once 5 of the
  # 10 are at 2.0 (2.45), i.e. at step 1000 + 4 x 20 = 1080.
  _write_metrics(tmp_path, _plateau_then_drop(1000, noise=0.0))
  steps, values = onset.loss_curve(str(tmp_path))
  assert onset.onset_step(steps, values, window=200, threshold=2.5) == 1080
  assert onset.trailing_mean(steps, values, 980, 200) == pytest.approx(2.9)
  assert onset.trailing_mean(steps, values, 1000, 200) == pytest.approx(2.81)
  assert onset.trailing_mean(steps, values, 1200, 200) == pytest.approx(2.0)


def test_no_drop_gives_none_and_noise_does_not_move_the_onset(tmp_path):
  _write_metrics(tmp_path, _plateau_then_drop(10**9))
  steps, values = onset.loss_curve(str(tmp_path))
  assert onset.onset_step(steps, values, 200, 2.5) is None
  _write_metrics(tmp_path, _plateau_then_drop(1000, noise=0.05, seed=3))
  steps, values = onset.loss_curve(str(tmp_path))
  assert 1060 <= onset.onset_step(steps, values, 200, 2.5) <= 1100
  # A run that starts below the threshold (a mixture from a warm-up that already copies)
  # shows no drop: it never crossed from above.
  _write_metrics(tmp_path, [(s, 2.0) for s in range(20, 401, 20)])
  steps, values = onset.loss_curve(str(tmp_path))
  assert onset.onset_step(steps, values, 200, 2.5) is None


def test_a_resumed_run_keeps_the_last_row_logged_for_a_step(tmp_path):
  # Killed at 1060 after a checkpoint at 1000: the resumed run logs 1020-1060 again, with
  # the values of the trajectory the final parameters come from.
  first = [(s, 2.9) for s in range(20, 1061, 20)]
  resumed = [(s, 2.0) for s in range(1020, 1401, 20)]
  _write_metrics(tmp_path, first + resumed)
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 1420, "train/lo')  # killed mid-write
  steps, values = onset.loss_curve(str(tmp_path))
  assert len(steps) == len(set(steps.tolist())) == 70
  assert values[steps == 1040][0] == 2.0
  row = onset.onset_row(str(tmp_path), [1000, 1400], window=200, onset_window=200,
                        threshold=2.5)
  assert row["onset"] == 1100 and row["means"]["1400"] == pytest.approx(2.0)
  assert row["around_onset"] == {"900": pytest.approx(2.9), "1300": pytest.approx(2.0)}
  assert "1100 (2.90 at 900, 2.00 at 1300)" in onset.markdown([row])


def test_a_drop_at_the_end_of_the_run_is_marked_unfinished(tmp_path):
  _write_metrics(tmp_path, _plateau_then_drop(1960, last=2000, noise=0.0))
  row = onset.onset_row(str(tmp_path), [2000], window=200, onset_window=100, threshold=2.5)
  assert row["onset"] == 2000 and row["at_end"]
  assert list(row["around_onset"]) == ["1900", "2000"]
  assert "the run ends there" in onset.markdown([row])


def test_missing_run_or_metric_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
    onset.loss_curve(str(tmp_path / "absent"))
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval/loss": 2.0}) + "\n")
  with pytest.raises(ValueError, match="train/loss"):
    onset.loss_curve(str(tmp_path))


def test_command_line_prints_the_table_and_a_rerun_replaces_its_row(tmp_path):
  run = tmp_path / "rope_24000-s0"
  run.mkdir()
  _write_metrics(run, _plateau_then_drop(1000, noise=0.0))
  out = tmp_path / "out"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, "-m", "evaluation.onset", f"--runs={run}", "--marks=1000,2000",
         f"--out={out}"]
  for _ in range(2):
    printed = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True).stdout
  # the 500-step mean at 1000 holds one loss of 2.0 among 25: (24 x 2.9 + 2.0) / 25 = 2.86
  assert "| rope_24000-s0 | 2.86 | 2.00 | 1080 (2.90 at 880, 2.00 at 1280) |" in printed
  rows = [json.loads(line) for line in open(out / "onset.jsonl")]
  assert [r["onset"] for r in rows] == [1080]  # measured twice, one row
  other = tmp_path / "alibi_24000-s0"
  other.mkdir()
  _write_metrics(other, _plateau_then_drop(10**9, noise=0.0))
  subprocess.run([sys.executable, "-m", "evaluation.onset", f"--runs={other}", "--marks=1500",
                  f"--out={out}"], cwd=root, capture_output=True, text=True, check=True)
  table = (out / "onset.md").read_text().splitlines()
  assert table[0] == "| run | 1000 | 1500 | 2000 | onset |"  # every row's marks
  assert table[2].startswith("| rope_24000-s0 | 2.86 |  | 2.00 | 1080")
  assert table[3] == "| alibi_24000-s0 |  | 2.90 |  | not within 2000 |"
