"""The demo study's statistics: seeds carried end to end, the evaluation standard error,
spread evaluation segments, seed mean/sd in summary.md, and the full study's plan."""
import json
import math
import os

import jax
import numpy as np
import pytest

import demo
import train
from configs import sweep_demo
from configs.default import get_config
from evaluation import aggregate, report
from evaluation.metrics import Accumulator, cluster_se, paired_difference
from input_pipeline import base
from models.loss import LOGIT_BLOCK, logit_chunk
from training import checkpoint


def _tiny(seed, train_len=16):
  c = get_config(f"posenc=rope,train_len={train_len}")
  c.model.num_layers, c.model.d_model, c.model.num_heads = 1, 32, 2
  c.batch_size, c.num_train_steps, c.eval_tokens = 4, 3, 256
  c.eval_every = c.checkpoint_every = c.log_every = 3
  c.seed, c.name = seed, "tiny"
  return c


def _params(workdir):
  _, model = checkpoint.load_run(workdir)
  from flax import nnx
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def test_seed_is_carried_end_to_end(tmp_path):
  for tag, seed in (("a", 0), ("b", 0), ("c", 1)):
    train.train_and_evaluate(_tiny(seed), str(tmp_path / tag))
  a, b, c = (_params(str(tmp_path / t)) for t in "abc")
  assert all(np.array_equal(x, y) for x, y in zip(a, b))  # same seed twice: identical
  assert any(not np.allclose(x, y) for x, y in zip(a, c))  # another seed: different
  saved = json.load(open(checkpoint.config_path(str(tmp_path / "c"))))
  assert saved["seed"] == 1 and saved["name"] == "tiny"


def _batch(nll, doc_ids, mask=None):
  nll = np.asarray(nll, np.float64)
  return ({"loss_mask": np.ones_like(nll) if mask is None else np.asarray(mask, np.float64),
           "doc_id": np.asarray(doc_ids)}, {"nll": nll})


def test_standard_error_matches_direct_computation_on_hand_made_windows():
  # 3 segments x 2 windows of 4 tokens; equal cluster sizes, so the ratio-estimator SE
  # equals the textbook sd(cluster means) / sqrt(K).
  rng = np.random.default_rng(0)
  nll = rng.gamma(2.0, 1.0, size=(6, 4))
  segs = np.array([0, 0, 1, 1, 2, 2])
  acc = Accumulator(4, cluster="segment")
  for rows in (slice(0, 4), slice(4, 6)):  # two batches; segment 2 straddles nothing
    acc.add(*_batch(nll[rows], segs[rows]))
  row = acc.row(is_text=True)
  means = np.array([nll[segs == s].mean() for s in range(3)])
  assert row["nll"] == pytest.approx(nll.mean())
  assert row["nll_se"] == pytest.approx(means.std(ddof=1) / math.sqrt(3))
  assert row["se_unit"] == "segment" and row["se_clusters"] == 3
  lo, hi = row["ppl_ci95"]
  assert lo == pytest.approx(math.exp(row["nll"] - 1.959964 * row["nll_se"]))
  assert hi == pytest.approx(math.exp(row["nll"] + 1.959964 * row["nll_se"]))
  # windows as units: 6 windows, each its own cluster
  acc = Accumulator(4, cluster="window")
  acc.add(*_batch(nll, segs))
  assert acc.row(True)["nll_se"] == pytest.approx(nll.mean(1).std(ddof=1) / math.sqrt(6))


def test_paired_difference_cancels_shared_segment_difficulty():
  # two "variants" on the same 3 segments: b = a + a per-segment shift; segment difficulty
  # (large) is shared, so the paired SE sees only the spread of the shifts
  rng = np.random.default_rng(0)
  segs = np.repeat(np.arange(3), 2)
  hard = np.array([1.0, 3.0, 5.0])[segs][:, None] + 0.01 * rng.standard_normal((6, 4))
  shift = np.array([0.10, 0.12, 0.14])[segs][:, None]
  rows = []
  for nll in (hard, hard + shift):
    acc = Accumulator(4, cluster="segment")
    acc.add(*_batch(nll, segs))
    rows.append(acc.row(True))
  diff, se = paired_difference(rows[1], rows[0])
  assert diff == pytest.approx(0.12) and rows[1]["nll"] - rows[0]["nll"] == pytest.approx(diff)
  assert se == pytest.approx(np.std([0.10, 0.12, 0.14], ddof=1) / math.sqrt(3))
  assert se < rows[0]["nll_se"] / 50  # unpaired: the segments' difficulty dominates
  other = dict(rows[0], segment_ids=[0, 1, 5])
  with pytest.raises(ValueError, match="same segments"):
    paired_difference(rows[1], other)


def test_standard_error_weights_unequal_clusters_by_tokens():
  # Masked tokens make clusters unequal: the ratio estimator, by hand.
  nll = np.array([[1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 0.0, 0.0], [5.0, 1.0, 1.0, 0.0]])
  mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], float)
  acc = Accumulator(4, cluster="window")
  acc.add(*_batch(nll, [0, 1, 2], mask))
  s, n = (nll * mask).sum(1), mask.sum(1)
  m = s.sum() / n.sum()
  direct = math.sqrt(3 / 2 * ((s - m * n) ** 2).sum()) / n.sum()
  assert acc.row(True)["nll_se"] == pytest.approx(direct)
  assert cluster_se(s, n) == pytest.approx(direct)
  assert math.isnan(cluster_se([1.0], [2.0]))  # one unit: no standard error


def test_spread_segments_cover_the_split_and_give_every_length_the_same_targets():
  docs = [np.arange(1000) % 251, (np.arange(3000) * 7) % 253]
  segs = base.spread_segments(docs, 64, 10)
  assert len(segs) == 10 and all(len(s) == 65 for s in segs)
  # spread: segments come from both documents, not only the first pages
  firsts = [int(s[0]) for s in segs]
  assert len(set(firsts)) == 10
  scored = {}
  for length in (16, 32, 64):
    targets = []
    for b in base.batched_eval(segs, length, 4):
      keep = b["loss_mask"] > 0
      targets += list(zip(np.repeat(b["doc_id"][:, None], length, 1)[keep], b["targets"][keep]))
    scored[length] = sorted(targets)
  assert scored[16] == scored[32] == scored[64] and len(scored[16]) == 640
  with pytest.raises(ValueError, match="do not fit"):
    base.spread_segments(docs, 1024, 4)


def test_summary_mean_and_band_match_the_rows():
  rows = []
  for seed, (p128, p512) in enumerate(((7.0, 9.0), (8.0, 12.0), (9.0, 9.0))):
    for length, ppl in ((128, p128), (512, p512)):
      rows.append({"run": f"x-s{seed}", "group": "x", "seed": seed, "run_dir": f"runs/x-s{seed}",
                   "variant": "none", "length": length, "train_len": 128, "mode": "m",
                   "split": "test", "max_tokens": 1, "segment_len": 512, "status": "ok",
                   "ppl": ppl, "nll": math.log(ppl), "nll_se": 0.004 + 0.001 * seed})
  text = report.summary_markdown(rows)
  assert "| x | 128 | 3 | 8.00 +- 1.00 | 10.00 +- 1.73 | 0.6 % |" in text
  ratios = np.array([9 / 7, 12 / 8, 9 / 9])  # each seed over its own train_len value
  assert f"{ratios.mean():.3f} +- {ratios.std(ddof=1):.3f}x" in text
  cell = aggregate.cell([r for r in rows if r["length"] == 512])
  assert (cell.mean, cell.lo, cell.hi, cell.seeds) == (10.0, 9.0, 12.0, 3)
  assert "below 1 %" in text


def test_summary_pairs_each_variant_with_its_runs_none_row():
  base = {"run": "m", "group": "m", "seed": 0, "run_dir": "pretrained:m", "train_len": 8,
          "mode": "m", "split": "test", "max_tokens": 1, "segment_len": 16, "status": "ok",
          "nll_se": 0.1, "segment_ids": [0, 1, 2], "segment_tokens": [10, 10, 10]}
  def row(variant, length, sums, **kw):
    nll = sum(sums) / 30
    return {**base, "variant": variant, "length": length, "nll": nll, "ppl": math.exp(nll),
            "segment_nll_sums": sums, **kw}
  rows = [row("none", 8, [10.0, 20.0, 30.0]), row("none", 16, [12.0, 22.0, 32.0]),
          row("yarn", 8, [10.0, 20.0, 30.0], same_as="none"),
          row("yarn", 16, [11.0, 21.5, 31.0])]
  text = report.summary_markdown(rows)
  se = np.std([-1.0, -0.5, -1.0], ddof=1) / math.sqrt(3) / 10  # per-token units
  assert f"| m +yarn | = none | {-2.5 / 30:+.3f} +- {se:.3f} |" in text
  assert "3 rows evaluated" in text and "1 reused an identical row" in text


def test_full_study_config_resolves_every_run():
  full = sweep_demo.get_config("full")
  jobs = demo.plan(full)
  groups = {j.name for j in jobs if j.source is None}
  import posenc
  assert set(posenc.names()) <= groups and {"rope_randomized", "rope-pi512"} <= {
      j.name for j in jobs}
  assert len(jobs) == 3 * len(groups) + 3
  for j in jobs:
    if j.source is None:
      c = j.make_config()
      assert (c.seed, c.name, c.num_train_steps) == (j.seed, j.name, full.train.num_train_steps)
      assert c.optim.learning_rate == full.train.learning_rate  # one shared recipe
  quick = {j.name for j in demo.plan(sweep_demo.get_config())}
  assert {"nope", "sinusoidal", "learned", "rope", "alibi", "t5_bias", "rope-pi512"} <= quick


def _study_rows(curves, seeds=2, train_len=128):
  """Rows of a fake study: curves {label: {length: ppl}} ('group +variant' labels)."""
  rows = []
  for label, by_len in curves.items():
    group, _, variant = label.partition(" +")
    for seed in range(seeds):
      for length, p in by_len.items():
        p = p * (1 + 0.01 * seed)
        rows.append({"run": f"{group}-s{seed}", "group": group, "seed": seed,
                     "run_dir": f"runs/{group}-s{seed}", "variant": variant or "none",
                     "length": length, "train_len": 512 if group.startswith("rope-pi") else
                     train_len, "mode": "m", "split": "test", "max_tokens": 1,
                     "segment_len": 1024, "status": "ok", "ppl": p, "nll": math.log(p),
                     "nll_se": 0.005})
  return rows


def test_phenomena_table_judges_each_claim_from_the_rows():
  from evaluation import phenomena
  flat = {128: 7.0, 256: 7.0, 512: 6.9, 1024: 6.9}
  curves = {"alibi": flat, "sinusoidal": {128: 8, 256: 10, 512: 14, 1024: 20},
            "learned": {128: 8, 256: 8.4, 512: 9, 1024: 10},  # only 1.05x at 2L: not "right past"
            "rope": {128: 6, 256: 6.3, 512: 7.2, 1024: 10}, "nope": {128: 9, 256: 9.5, 512: 10, 1024: 11},
            "t5_bias": {128: 7, 256: 7.2, 512: 7.5, 1024: 8},
            "rope +linear": {512: 20}, "rope +ntk": {512: 7}, "rope +yarn": {512: 6.8},
            "rope-pi512": {512: 6.5}}
  table = {c[0]: c for c in phenomena.checks(_study_rows(curves))}
  sin_learned = table["sinusoidal and learned absolute degrade right past L"]
  assert sin_learned[3] == "partly" and "sinusoidal 1.250 +- 0.000x at 256" in sin_learned[1]
  assert table["rotary (RoPE) degrades past L"][3] == "yes"
  assert table["ALiBi and KERPLE stay flat or improve"][3] == "yes"
  t5 = lambda table: [c for k, c in table.items() if k.startswith("T5 bias")][0][3]
  assert t5(table) == "yes"  # 1.07x vs 1.2x at 4L, 1.14x vs 1.67x at 8L
  slow_then_not = dict(curves, t5_bias={128: 7, 256: 7.2, 512: 7.5, 1024: 11.67})
  assert t5({c[0]: c for c in phenomena.checks(_study_rows(slow_then_not))}) == "partly"
  nope = [c for k, c in table.items() if k.startswith("NoPE")][0]
  assert nope[3] == "yes"  # 1.22x between alibi 0.99x and rope 1.67x
  assert table["zero-shot PI worse than NTK / dynamic NTK / YaRN"][3] == "yes"
  assert [c for k, c in table.items() if k.startswith("PI after")][0][3] == "yes"
  curves["rope-pi512"] = {512: 7.5}  # worse than yarn's 6.8: not reproduced
  table = {c[0]: c for c in phenomena.checks(_study_rows(curves))}
  assert [c for k, c in table.items() if k.startswith("PI after")][0][3] == "no"


def test_report_handles_rows_without_se_and_without_a_train_len_reference(tmp_path):
  # A pretrained checkpoint evaluated only past its context, one segment (no SE).
  rows = [{"run": "smol", "group": "smol", "seed": 0, "run_dir": "pretrained:smol",
           "variant": v, "length": 16384, "train_len": 8192, "mode": "m", "split": "test",
           "max_tokens": 1, "segment_len": 16384, "status": "ok", "ppl": p,
           "nll": math.log(p), "nll_se": None} for v, p in (("none", 70.0), ("yarn", 36.0))]
  text = report.summary_markdown(rows)
  assert "2 of 2 rows have no standard error" in text and "below 1 %" not in text
  from evaluation import plots
  plots.ppl_figure(rows, str(tmp_path / "p.png"))
  assert (tmp_path / "p.png").stat().st_size > 0


def test_output_entropy_equals_a_direct_computation():
  import jax.numpy as jnp
  from models.loss import entropy, nll_and_entropy, per_token
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(2, 5, 7)) * 3, jnp.float32)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  direct = -(p * np.log(p)).sum(-1)
  assert np.allclose(entropy(logits), direct, atol=1e-5)

  class Head:  # per_token's chunked path must give the same numbers as one block
    def logits(self, h):
      return h
  targets = jnp.zeros((2, 5), jnp.int32)
  full = per_token(Head(), logits, targets, nll_and_entropy, chunk=8)
  chunked = per_token(Head(), logits, targets, nll_and_entropy, chunk=2)
  assert np.allclose(full[1], direct, atol=1e-5) and np.allclose(chunked[1], direct, atol=1e-5)
  assert np.allclose(chunked[0], full[0], atol=1e-6)
  # rows: the mean entropy and its position buckets come from the same masked tokens
  acc = Accumulator(5, cluster="window")
  mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], float)
  acc.add({"loss_mask": mask, "doc_id": np.array([0, 1])},
          {"nll": np.asarray(full[0]), "entropy": direct})
  row = acc.row(True)
  assert row["entropy"] == pytest.approx((direct * mask).sum() / mask.sum())
  assert row["position_entropy"][0] == pytest.approx(direct[:, 0].mean())


def test_loss_chunk_bounds_the_live_logit_block():
  assert logit_chunk(4, 256) == 2048  # byte models: as before
  assert logit_chunk(1, 49152) == 256  # SmolLM2: 48 MB of float32 logits per chunk
  assert logit_chunk(64, 49152) == 64  # never below 64 positions
  for b, v in ((1, 49152), (2, 32000), (8, 128256), (32, 256)):
    c = logit_chunk(b, v)
    assert c & (c - 1) == 0 and (b * c * v <= LOGIT_BLOCK or c == 64)


def test_needle_study_trains_every_family_with_the_mixture_and_writes_the_grid(tmp_path):
  study = sweep_demo.get_config("needle")
  jobs = demo.plan(study)
  assert {j.name for j in jobs} == {"nope", "sinusoidal", "learned", "rope", "alibi", "t5_bias"}
  for j in jobs:
    c = j.make_config()
    assert (c.data.needle_fraction, c.data.repeat_fraction, c.data.repeat_warmup_steps) == (
        0.25, 0.25, 4800)
    assert (c.batch_size, c.num_train_steps, c.train_len) == (16, 8000, 128)
  assert len(jobs) == 18 and {j.seed for j in jobs} == {0, 1, 2}
  smoke = sweep_demo.get_config("needle_smoke")
  smoke.train.runs_dir, smoke.out = str(tmp_path / "runs"), str(tmp_path / "results")
  rows = demo.run_demo(smoke)
  # 2 runs; rope: none + yarn, alibi: none + a skipped yarn; 2 lengths x 2 depths each
  ok = [r for r in rows if r["status"] == "ok"]
  assert len(ok) == 2 * 3 * 4 and {r["run"] for r in ok} == {"rope-s0", "alibi-s0", "rope-s1",
                                                              "alibi-s1"}
  assert all(0.0 <= r["accuracy"] <= 1.0 and r["trials"] == 2 for r in ok)
  assert "## Across training seeds" in (tmp_path / "results" / "needle.md").read_text()
  with pytest.raises(ValueError, match="valid choices: full, needle"):
    sweep_demo.get_config("needles")


def test_panel_styles_tell_every_line_apart():
  """More lines than colours (the full study: 15 families): no two lines share colour and
  dash, and the first 14 are solid."""
  from evaluation.plots import PALETTE, panel_styles
  styles = panel_styles([f"line{i}" for i in range(2 * len(PALETTE) + 3)])
  keys = [(s["color"], str(s["linestyle"])) for s in styles.values()]
  assert len(set(keys)) == len(keys)
  assert all(s["linestyle"] == "-" for s in list(styles.values())[:len(PALETTE)])
