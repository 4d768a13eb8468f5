"""Training/evaluation position sampling (input_pipeline/positions.py)."""
import json

import numpy as np
import pytest

from configs.common import resolve
from configs.default import get_config
from input_pipeline import positions


def cfg(**kw):
  c = positions.default_positions_config()
  c.update(kw)
  return c


def batch(b=4, length=32):
  return {"inputs": np.zeros((b, length), np.int32),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()}


def test_contiguous_is_the_default_and_leaves_the_batch():
  c = cfg()
  assert c.kind == "contiguous" and c.eval == "contiguous"
  x = batch()
  assert positions.apply_positions(c, x, seed=0, step=3) is x
  want = np.tile(np.arange(5000), (2, 1))
  np.testing.assert_array_equal(positions.eval_positions(c, 5000, 2), want)


def test_randomized_sorted_unique_in_range():
  c = cfg(kind="randomized", max_len=256)
  for step in range(20):
    pos = positions.apply_positions(c, batch(8, 64), seed=1, step=step)["positions"]
    assert pos.shape == (8, 64) and pos.dtype == np.int32
    assert (np.diff(pos, axis=1) > 0).all()  # sorted and unique
    assert pos.min() >= 0 and pos.max() < 256


def test_randomized_covers_the_whole_range():
  c = cfg(kind="randomized", max_len=512)
  pos = np.concatenate([positions.train_positions(c, 8, 32, 0, s) for s in range(10)])
  assert pos.max() > 480 and pos.min() < 30  # visits positions far beyond train_len
  counts = np.bincount(pos.ravel(), minlength=512)
  assert counts[:256].sum() / counts.sum() == pytest.approx(0.5, abs=0.06)  # uniform


def test_randomized_reproducible_and_varies():
  c = cfg(kind="randomized", max_len=1024)
  a = positions.train_positions(c, 4, 32, seed=0, step=5)
  np.testing.assert_array_equal(a, positions.train_positions(c, 4, 32, seed=0, step=5))
  assert not np.array_equal(a, positions.train_positions(c, 4, 32, seed=0, step=6))
  assert not np.array_equal(a, positions.train_positions(c, 4, 32, seed=1, step=5))
  assert len({tuple(r) for r in a}) == 4  # per row
  shared = positions.train_positions(cfg(kind="randomized", per_row=False), 4, 32, 0, 5)
  assert (shared == shared[0]).all()  # one subset per batch, as the reference


def test_apply_positions_does_not_mutate_input():
  x = batch()
  before = x["positions"].copy()
  out = positions.apply_positions(cfg(kind="randomized"), x, seed=0, step=0)
  np.testing.assert_array_equal(x["positions"], before)
  assert not np.array_equal(out["positions"], before) and out["inputs"] is x["inputs"]


def test_eval_positions_randomized():
  c = cfg(eval="randomized", max_len=128)
  a = positions.eval_positions(c, 100, 3, seed=0, index=2)
  assert (np.diff(a, axis=1) > 0).all() and a.max() < 128
  np.testing.assert_array_equal(a, positions.eval_positions(c, 100, 3, seed=0, index=2))
  with pytest.raises(ValueError, match="max_len"):
    positions.eval_positions(c, 200, 1)


@pytest.mark.parametrize("bad, match", [
    (dict(kind="shuffled"), "valid choices: contiguous, randomized"),
    (dict(eval="random"), "valid choices: contiguous, randomized"),
    (dict(kind="randomized", max_len=64), "max_len=64 is smaller than train_len=128"),
])
def test_validate_errors(bad, match):
  with pytest.raises(ValueError, match=match):
    positions.validate(cfg(**bad), train_len=128)
  positions.validate(cfg(max_len=64), train_len=128)  # contiguous ignores max_len


def test_table_encoding_beyond_its_rows_is_a_clear_error():
  c = get_config("posenc=learned,data=markov,train_len=32")
  c.positions.kind, c.positions.max_len = "randomized", 4096
  with pytest.raises(ValueError, match=r"supports only 0..2047.*posenc.learned.max_len"):
    resolve(c)
  c.posenc.learned.max_len = 4096
  resolve(c)
  c = get_config("posenc=rope,data=markov,train_len=32")
  c.positions.kind, c.positions.max_len = "randomized", 1 << 20
  resolve(c)  # no table, any max_len


def test_tiny_training_run_randomized(tmp_path):
  from train import train_and_evaluate  # pylint: disable=g-import-not-at-top
  c = get_config("posenc=fire,data=markov,train_len=32")
  c.model.num_layers, c.model.d_model, c.model.num_heads = 1, 32, 2
  c.batch_size, c.num_train_steps, c.eval_tokens = 4, 5, 256
  c.log_every, c.eval_every, c.checkpoint_every = 5, 5, 5
  c.positions.kind, c.positions.max_len = "randomized", 1024  # past fire's L = 512
  state = train_and_evaluate(c, str(tmp_path))
  assert int(state["step"]) == 5
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  losses = [r[k] for r in rows for k in ("train/loss", "eval/loss") if k in r]
  assert len(losses) == 2 and all(np.isfinite(losses))
