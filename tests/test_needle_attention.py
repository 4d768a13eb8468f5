"""evaluation/needle_attention.py: the answer query's weight on the key and on far keys."""
import json

import jax
import numpy as np
import pytest

from configs.common import resolve
from evaluation import needle, needle_attention, runner
from models import build_model

ENCODE = lambda text: np.frombuffer(text.encode(), np.uint8).astype(np.int32)
FILLER = np.random.default_rng(0).integers(97, 123, 4000).astype(np.int32)


def test_trial_examples_are_the_grids_and_the_key_is_found_where_it_was_put():
  a = needle.trial_example(FILLER, ENCODE, 200, 0.5, seed=3, t=7)
  b = needle.trial_example(FILLER, ENCODE, 200, 0.5, seed=3, t=7)
  assert (a["tokens"] == b["tokens"]).all()
  start = needle.key_start(a)
  key = a["candidates"][0]
  assert (a["tokens"][start:start + len(key)] == key).all()
  assert (a["tokens"][a["answer_at"]:] == key).all()  # the answer is the same key
  assert a["needle_at"] < start < a["needle_at"] + len(a["needle"])


def test_weights_are_the_answer_querys_attention_row(tiny_config, monkeypatch):
  model = build_model(resolve(tiny_config(posenc="t5_bias", **{"model.num_layers": 2})))
  example = needle.trial_example(FILLER, ENCODE, 96, 0.0, seed=0, t=0)
  n, start, k = example["answer_at"], needle.key_start(example), example["candidates"].shape[1]
  got = needle_attention.answer_query_attention(model, example, far=10)
  maps = needle_attention.attention_maps(model, jax.numpy.asarray(example["tokens"][None, :n]),
                                         jax.numpy.arange(n)[None])
  for layer, m in enumerate(maps):
    row = np.asarray(m[0, :, n - 1])  # [h, n]: the query at the question's last token
    np.testing.assert_allclose(got["key"][layer], row[:, start:start + k].sum(-1), rtol=1e-6)
    np.testing.assert_allclose(got["far"][layer], row[:, :n - 11].sum(-1), rtol=1e-6)
  # digit j's query (the true answer before it) reads each key token: the rows of the maps
  # over the prompt and the answer's first k - 1 tokens
  full = needle_attention.attention_maps(
      model, jax.numpy.asarray(example["tokens"][None, :n + k - 1]), jax.numpy.arange(n + k - 1)[None])
  for layer, m in enumerate(full):
    rows = np.asarray(m[0, :, n - 1:n + k - 1, start:start + k])  # [h, k queries, k keys]
    np.testing.assert_allclose(got["digits"][layer], rows, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(got["digits"][layer][:, 0].sum(-1), got["key"][layer], rtol=1e-5)
  # far = 0: every key but the query itself, so far + self weight = 1
  none_near = needle_attention.answer_query_attention(model, example, far=0)["far"]
  self_weight = np.stack([np.asarray(m[0, :, n - 1, n - 1]) for m in maps])
  np.testing.assert_allclose(none_near + self_weight, 1.0, atol=1e-5)


def test_cell_row_under_a_variant_keeps_each_trials_weight(tiny_config):
  config = resolve(tiny_config(posenc="rope", **{"model.num_layers": 2}))
  model = build_model(config)
  length = 4 * config.train_len
  rows = {}
  for variant in ("none", "yarn"):
    _, scaled = runner.one_variant(config, model, variant, length)
    rows[variant] = needle_attention.cell_row("r", scaled, FILLER, ENCODE, length, 0.0, 3,
                                              far=config.train_len, variant=variant)
  for row in rows.values():
    assert len(row["trial_key"]) == 2 and all(len(t) == 3 for t in row["trial_key"])
    digits = np.asarray(row["copy_head_digits"])  # [k, k]: the copy head's query j on key i
    assert digits.shape == (5, 5)
    np.testing.assert_allclose(digits[0].sum(), row["best_key"][-1], atol=2e-4)
    np.testing.assert_allclose(np.mean(row["trial_key"], axis=1), row["best_key"], atol=2e-4)
  assert rows["yarn"]["variant"] == "yarn"
  # YaRN rescales the rotation at 4x the training length, so the answer query looks elsewhere
  assert not np.allclose(rows["yarn"]["key"], rows["none"]["key"], atol=1e-4)


def test_outcome_table_splits_the_heads_weight_by_the_grids_trials():
  row = {"run": "rope-s0", "run_dir": "/abs/runs/study/rope-s0", "variant": "yarn",
         "length": 512, "depth": 0.0, "seed": 0, "trials": 4, "best_head": [3, 1],
         "best_key": [0.01, 0.45], "trial_key": [[0.0] * 4, [0.9, 0.1, 0.7, 0.1]]}
  grid = {"run_dir": "runs/study/rope-s0", "variant": "yarn", "length": 512, "depth": 0.0,
          "seed": 0, "status": "ok", "trial_exact": [1, 0, 1, 0]}
  assert needle_attention.by_outcome(row, grid) == {"exact": 2, "key_exact": 0.8,
                                                    "key_missed": 0.1}
  other = dict(grid, run_dir="runs/other/rope-s0", trial_exact=[0, 0, 0, 0])
  table = needle_attention.outcome_table([row], [other, grid])
  assert table.splitlines()[2].startswith("| study/rope-s0 | yarn |")
  assert table.splitlines()[2].endswith("| 2 / 4 | (2, 1) | 0.450 | 0.8 | 0.1 |")
  assert len(table.splitlines()) == 3  # the other study's rope-s0 is not this run
  # an ablated row is scored with its own model: set beside its own trials, not the grid's
  ablated = dict(row, ablate="2:1:1-5", trial_exact=[0, 0, 0, 1])
  line = needle_attention.outcome_table([ablated], [grid]).splitlines()[2]
  assert line.startswith("| study/rope-s0 | yarn | 2:1:1-5 |")
  assert line.endswith("| 1 / 4 | (2, 1) | 0.450 | 0.1 | 0.5667 |")
  assert needle_attention.by_outcome(row, dict(grid, trial_exact=[1, 1, 0, 0, 1]))["exact"] == 2
  with pytest.raises(ValueError, match="3 trials"):
    needle_attention.by_outcome(row, dict(grid, trial_exact=[1, 1, 0]))
  # the grid cell at its largest trial count, whichever order its rows are in
  early = dict(grid, trials=2, trial_exact=[1, 0])
  for rows in ([dict(grid, trials=4), early], [early, dict(grid, trials=4)]):
    assert needle_attention.outcome_table([row], rows).splitlines()[2].endswith(
        "| 2 / 4 | (2, 1) | 0.450 | 0.8 | 0.1 |")


def test_a_cell_measured_again_replaces_its_row(tmp_path):
  row = {"run": "rope-s0", "run_dir": "runs/a/rope-s0", "variant": "yarn", "length": 512,
         "depth": 0.0, "trials": 20, "far": 128, "seed": 0, "best_key": [0.1, 0.5]}
  needle_attention.save_row(str(tmp_path), row)
  needle_attention.save_row(str(tmp_path), dict(row, best_key=[0.1, 0.6]))
  needle_attention.save_row(str(tmp_path), dict(row, variant="none"))
  needle_attention.save_row(str(tmp_path), dict(row, run_dir="runs/b/rope-s0"))
  rows = [json.loads(line) for line in open(tmp_path / "needle_attention.jsonl")]
  assert len(rows) == 3
  assert [r["best_key"] for r in rows if r["variant"] == "yarn" and "/a/" in r["run_dir"]] == [
      [0.1, 0.6]]


def test_pair_margins_add_up_to_the_keys_log_odds_under_the_heads_softmax(tiny_config):
  # s_key - E_p[s] = log p_key - E_p[log p] (the softmax's normaliser cancels), so the pairs'
  # margins must sum to what the model's own attention map gives (every dim rotated here).
  config = resolve(tiny_config(posenc="rope", **{"model.num_layers": 2}))
  model = build_model(config)
  _, scaled = runner.one_variant(config, model, "yarn", 4 * config.train_len)
  example = needle.trial_example(FILLER, ENCODE, 4 * config.train_len, 0.0, seed=0, t=1)
  n, start = example["answer_at"], needle.key_start(example)
  maps = needle_attention.attention_maps(scaled, jax.numpy.asarray(example["tokens"][None, :n]),
                                         jax.numpy.arange(n)[None])
  for layer in range(2):
    for head in (0, 1):
      p = np.asarray(maps[layer][0, head, n - 1], np.float64)
      margins = needle_attention.pair_margins(scaled, example, layer, head)
      assert margins.shape == (config.model.head_dim // 2,)
      np.testing.assert_allclose(margins.sum(), np.log(p[start]) - p @ np.log(p), rtol=2e-3,
                                 atol=2e-3)
  # each pair is one rotation (i with i + d/2), so its margin depends on distances only:
  # shifting every position leaves every pair's margin as it was
  np.testing.assert_allclose(needle_attention.pair_margins(scaled, example, 1, 0, offset=37),
                             needle_attention.pair_margins(scaled, example, 1, 0), atol=2e-4)
  t5 = build_model(resolve(tiny_config(posenc="t5_bias")))
  with pytest.raises(ValueError, match="plain rotary"):
    needle_attention.pair_margins(t5, example, 0, 0)
  with pytest.raises(ValueError, match="plain rotary"):
    needle_attention.ablate_query_pairs(t5, 0, 0, [1])


def test_ablating_query_pairs_removes_exactly_their_margins(tiny_config):
  config = resolve(tiny_config(posenc="rope", **{"model.num_layers": 2}))
  model = build_model(config)
  example = needle.trial_example(FILLER, ENCODE, 2 * config.train_len, 0.0, seed=0, t=0)
  before = needle_attention.pair_margins(model, example, 1, 1)
  _, ablated = runner.one_variant(config, model, "none", 2 * config.train_len)
  layer, head, pairs = needle_attention.parse_ablation("2:1:1-3")
  assert (layer, head, pairs) == (1, 1, [1, 2, 3])
  needle_attention.ablate_query_pairs(ablated, layer, head, pairs)
  after = needle_attention.pair_margins(ablated, example, 1, 1)
  np.testing.assert_allclose(after[pairs], 0.0, atol=1e-6)  # those pairs score nothing
  assert np.abs(after[[0, 4, 5]]).max() > 1e-4  # the others still score keys
  # the run's model is untouched, and other heads of the layer keep their pairs
  np.testing.assert_allclose(needle_attention.pair_margins(model, example, 1, 1), before)
  assert np.abs(needle_attention.pair_margins(ablated, example, 1, 0)[pairs]).max() > 1e-4
  for bad in ((1, 1, [3, 99]), (7, 1, [1]), (1, 9, [1])):  # pairs / layer / head out of range
    with pytest.raises(ValueError, match="the model has"):
      needle_attention.ablate_query_pairs(ablated, *bad)
  with pytest.raises(ValueError, match="layer:head:first-last"):
    needle_attention.parse_ablation("2:1")
