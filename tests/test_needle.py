"""Needle retrieval (evaluation/needle.py, eval_needle.py): exact placement by depth,
teacher-forced exact match = greedy decoding of the answer, candidate rank = direct
log-probabilities, Wilson interval, effective length, resumable grid."""
import types

import jax.numpy as jnp
import numpy as np
import pytest

import eval_needle
from evaluation import needle, plots, results
from models.generate import generate
from test_generate import _model  # sharpened tiny models (non-uniform logits)

ENCODE = lambda text: np.frombuffer(text.encode(), np.uint8).astype(np.int32)
FILLER = ENCODE("It was the best of times, it was the worst of times; it was the age of "
                "wisdom, it was the age of foolishness. " * 40)


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_needle_placement_is_exact(depth):
  ex = needle.make_example(FILLER, ENCODE, 300, depth, np.random.default_rng(0))
  tokens, at, n = ex["tokens"], ex["needle_at"], len(ex["needle"])
  question, answer = ENCODE(needle.QUESTION), ex["candidates"][0]
  n_fill = 300 - n - len(question) - len(answer)
  assert len(tokens) == 300 and at == round(depth * n_fill)
  assert ex["answer_at"] - at == needle.distance_back(ENCODE, 300, depth)
  np.testing.assert_array_equal(tokens[at:at + n], ex["needle"])
  np.testing.assert_array_equal(tokens[ex["answer_at"]:], answer)
  np.testing.assert_array_equal(tokens[ex["answer_at"] - len(question):ex["answer_at"]], question)
  key = bytes(answer.astype(np.uint8)).decode()
  assert needle.NEEDLE.format(key=key).encode() == bytes(ex["needle"].astype(np.uint8))
  # the filler around the needle is one contiguous slice of the text (real text, in order)
  fill = np.concatenate([tokens[:at], tokens[at + n:ex["answer_at"] - len(question)]])
  starts = [i for i in range(len(FILLER) - len(fill) + 1)
            if (FILLER[i:i + len(fill)] == fill).all()]
  assert starts
  cands = ex["candidates"]
  assert len({bytes(c.astype(np.uint8)) for c in cands}) == len(cands) == 10


def _with_answer(ex, answer):
  ex = dict(ex)
  ex["tokens"] = np.concatenate([ex["tokens"][:ex["answer_at"]], answer])
  ex["candidates"] = np.concatenate([answer[None], ex["candidates"][1:]])
  return ex


def test_teacher_forced_exact_match_equals_greedy_decoding(tiny_config):
  _, model = _model("rope", tiny_config)
  ex = needle.make_example(FILLER, ENCODE, 120, 0.5, np.random.default_rng(1), distractors=3)
  prefix, k = ex["tokens"][None, :ex["answer_at"]], len(ex["candidates"][0])
  greedy = generate(model, prefix, k, temperature=0.0)[0, -k:]
  for answer in (ex["candidates"][0], greedy):  # a random key, and the greedy answer itself
    exact, _, correct = needle.score_example(model, _with_answer(ex, answer))
    assert exact == bool((greedy == answer).all()) == bool(correct.all())
    assert correct[0] == (greedy[0] == answer[0])  # the first answer token has no teacher forcing
  assert needle.score_example(model, _with_answer(ex, greedy))[0]  # both outcomes exercised
  assert not (greedy == ex["candidates"][0]).all()


def test_rank_equals_direct_log_probabilities(tiny_config):
  _, model = _model("alibi", tiny_config)
  ex = needle.make_example(FILLER, ENCODE, 100, 0.3, np.random.default_rng(2), distractors=5)
  _, rank, _ = needle.score_example(model, ex)
  at, logps = ex["answer_at"], []
  for cand in ex["candidates"]:  # full forward of each complete sequence
    seq = np.concatenate([ex["tokens"][:at], cand])[None]
    logits = np.asarray(model(jnp.asarray(seq), jnp.arange(seq.shape[1])[None]))[0]
    lp = needle.log_softmax(logits[at - 1:-1])
    logps.append(lp[np.arange(len(cand)), cand].sum())
  assert rank == 1 + sum(lp > logps[0] for lp in logps[1:])


def test_wilson_interval_and_effective_length():
  lo, hi = needle.wilson_interval(0, 20)
  assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)
  lo, hi = needle.wilson_interval(20, 20)
  assert lo == pytest.approx(0.8389, abs=1e-4) and hi == 1.0
  rows = [{"length": n, "depth": d, "accuracy": a} for n, accs in
          {64: (1, 1), 128: (0.8, 1), 256: (0.8, 0.8), 512: (0.2, 0.9), 1024: (1, 1)}.items()
          for d, a in zip((0, 1), accs)]
  assert needle.effective_length(rows, 128, relative=True) == 256  # 0.8 >= 0.85 * 0.9
  assert needle.effective_length(rows, 128, relative=False) == 128  # 0.8 < 0.85 (abs)
  with pytest.raises(ValueError, match="depth"):
    needle.make_example(FILLER, ENCODE, 300, 1.5, np.random.default_rng(0))


def test_effective_length_compares_lengths_over_the_same_depths():
  """A length evaluated at fewer depths is compared over those only, and a variant with no
  row at the training length is read against the model's own (variant none) there."""
  none = [{"length": n, "depth": d, "accuracy": a} for n, accs in
          {64: (1, 1, 1), 128: (0.0, 0.9, 1)}.items() for d, a in zip((0, 0.5, 1), accs)]
  assert needle.common_depths(none) == [0, 0.5, 1]
  assert needle.effective_length(none, 128, relative=False) == 64  # mean 0.63 at 128
  variant = [{"length": 256, "depth": 0.5, "accuracy": 0.8},
             {"length": 512, "depth": 0.5, "accuracy": 0.7}]
  assert needle.common_depths(variant + none) == [0.5]
  assert needle.effective_length(variant, 128, relative=True, reference=none) == 256
  assert needle.effective_length(variant, 128, relative=True) is None  # no reference
  assert needle.effective_length(variant + none, 128, relative=False) == 128  # 0.8 < 0.85
  assert needle.effective_length(variant + none, 128, relative=True) == 256  # over 0.5 only


def test_relative_effective_length_counts_from_the_training_length_up():
  """A failure below L (never trained there) does not end the relative count, which asks
  whether retrieval survives past L; short_failures lists it. The absolute count (RULER's
  effective context) starts at the shortest length and stops there."""
  rows = [{"length": n, "depth": d, "accuracy": a} for n, accs in
          {64: (0.0, 0.2), 128: (1, 1), 256: (0.9, 1), 512: (0.5, 0.6)}.items()
          for d, a in zip((0, 1), accs)]
  assert needle.effective_length(rows, 128, relative=True) == 256
  assert needle.short_failures(rows, 128) == [64]
  assert needle.effective_length(rows, 128, relative=False) is None  # 0.1 < 0.85 at 64
  at_l_fails = [dict(r, accuracy=0.0) if r["length"] == 128 else r for r in rows]
  assert needle.effective_length(at_l_fails, 128, relative=True) is None  # no accuracy at L
  assert needle.short_failures(at_l_fails, 128) == []  # no bound to miss


def _fake_run(monkeypatch, config, model):
  """eval_needle reads this tiny model as the run "runs/fake", FILLER as its books."""
  monkeypatch.setattr(eval_needle.checkpoint, "read_config", lambda _: config)
  monkeypatch.setattr(eval_needle.checkpoint, "load_run", lambda _: (config, model))
  monkeypatch.setattr(eval_needle, "filler_tokens", lambda *_: FILLER)


def test_grid_is_resumable(tmp_path, tiny_config, monkeypatch):
  config, model = _model("rope", tiny_config, layers=1)
  _fake_run(monkeypatch, config, model)
  calls = []
  real = needle.evaluate_cell
  monkeypatch.setattr(needle, "evaluate_cell", lambda *a, **k: calls.append(a[3:5]) or real(*a, **k))
  opts = types.SimpleNamespace(runs="runs/fake", lengths="x4,x6", depths="0,1", trials=2,
                               distractors=2, variants="none", split="test", seed=0,
                               out=str(tmp_path))
  rows = eval_needle.run_grid(opts, log=lambda *_: None)
  assert len(rows) == 4 and len(calls) == 4 and {r["length"] for r in rows} == {64, 96}
  group = config.get("name") or "fake"
  assert {(r["group"], r["run_seed"]) for r in rows} == {(group, config.seed)}
  eval_needle.run_grid(opts, log=lambda *_: None)
  assert len(calls) == 4  # nothing recomputed
  path = tmp_path / "needle.jsonl"
  kept = path.read_text().splitlines()
  path.write_text("\n".join(kept[1:]) + "\n")  # lose one finished row
  rows = eval_needle.run_grid(opts, log=lambda *_: None)
  assert len(calls) == 5 and len(rows) == 4
  eval_needle.write_report(str(tmp_path), rows)
  assert (tmp_path / "needle.md").exists()
  assert list(tmp_path.glob("needle_heatmap_*.png"))


def test_lengths_past_a_learned_table_are_rows_that_say_so(tmp_path, tiny_config, monkeypatch):
  """The default grid reaches 64x L; a learned table shorter than a length gets an
  "unsupported" row naming the table (as eval_extrapolate's rows do), and the cells around
  it are still scored: the grid does not stop at the first length past the table."""
  config, model = _model("learned", tiny_config, layers=1, **{"posenc.learned.max_len": 80})
  _fake_run(monkeypatch, config, model)
  opts = types.SimpleNamespace(runs="runs/fake", lengths="x6,x4", depths="0,1", trials=1,
                               distractors=2, variants="none", split="test", seed=0,
                               out=str(tmp_path))
  rows = {(r["length"], r["depth"]): r for r in eval_needle.run_grid(opts, log=lambda *_: None)}
  assert [rows[(64, d)]["status"] for d in (0, 1)] == ["ok", "ok"]
  for d in (0, 1):
    assert rows[(96, d)]["status"].startswith("unsupported:")
    assert "table has 80 rows" in rows[(96, d)]["status"]
  eval_needle.write_report(str(tmp_path), list(rows.values()))
  report = (tmp_path / "needle.md").read_text()
  assert "| 64 |" in report and "| 96 |" not in report
  not_scored = report.split("## Cells not scored")[1]
  assert "fake none at 96 (depths 0, 1): unsupported:" in not_scored
  assert "table has 80 rows" in not_scored


def test_report_keeps_apart_two_runs_that_share_a_name(tmp_path):
  """Two run dirs with one basename (runs/a/rope-s1, runs/b/rope-s1) are two heatmaps and
  two tables, each with its own accuracy, never one cell overwritten by the other."""
  def row(run_dir, accuracy):
    return {"task": "needle", "run": run_dir.rsplit("/", 1)[1], "group": "rope",
            "run_dir": run_dir, "variant": "none", "train_len": 16, "length": 32,
            "depth": 0.0, "trials": 2, "accuracy": accuracy, "mean_rank": 1.0,
            "status": "ok", "distance": 20, "token_accuracy": [accuracy]}
  rows = [row("runs/a/rope-s1", 1.0), row("runs/b/rope-s1", 0.0), row("runs/b/rope-s2", 0.5)]
  named = results.distinct_run_names(rows)
  assert [r["run"] for r in named] == ["a/rope-s1", "b/rope-s1", "rope-s2"]
  assert rows[0]["run"] == "rope-s1"  # the rows themselves are not changed
  eval_needle.write_report(str(tmp_path), rows)
  text = (tmp_path / "needle.md").read_text()
  sections = {part.split(" ", 1)[0]: part for part in text.split("\n## ")[1:]}
  assert "| 0 | 1.00 |" in sections["a/rope-s1"] and "| 0 | 0.00 |" in sections["b/rope-s1"]
  assert {p.name for p in tmp_path.glob("needle_heatmap_*.png")} == {
      "needle_heatmap_a_rope-s1_none.png", "needle_heatmap_b_rope-s1_none.png",
      "needle_heatmap_rope-s2_none.png"}


def test_report_reads_each_cell_at_its_largest_trial_count(tmp_path, monkeypatch):
  """A cell extended from 5 to 20 trials keeps its 5-trial row (the key holds the trial
  count), whose trials are the first 5 of the 20: the grid, the paired table, the seed
  spread and the distance figure read the 20-trial row alone, never a mean of the two."""
  def row(variant, exact, run_dir="runs/m-s0"):
    return {"task": "needle", "run": run_dir.rsplit("/", 1)[1], "group": "m",
            "run_dir": run_dir, "variant": variant, "train_len": 16, "length": 64,
            "depth": 0.5, "seed": 0, "trials": len(exact), "distractors": 9,
            "split": "test", "status": "ok", "distance": 30,
            "accuracy": float(np.mean(exact)), "mean_rank": 1.0, "token_accuracy": [1.0],
            "trial_exact": exact, "trial_rank": [1] * len(exact)}
  full = [row("yarn", [1] * 12 + [0] * 8), row("self_extend", [1] * 20),
          row("yarn", [0] * 20, run_dir="runs/m-s1")]
  early = [row("yarn", [1] * 5), row("self_extend", [1] * 5)]
  rows = full + early  # the 20-trial rows first: a last-row-wins reading would show 1.00
  assert eval_needle.largest_cells(rows) == full
  drawn = []
  monkeypatch.setattr(eval_needle.plots, "needle_distance_figure",
                      lambda rs, *_: drawn.extend(rs))
  eval_needle.write_report(str(tmp_path), rows, lambda r: r["distance"])
  text = (tmp_path / "needle.md").read_text()
  assert "| 0.5 | 0.60 |" in text and "| 0.5 | 1.00 |" in text
  paired = [l for l in text.splitlines() if l.startswith("| m-s0 |")]
  assert paired == ["| m-s0 | 64 | 0.5 | 20 | self_extend | yarn | 12 | 8 | 0 | 0 | 0.008 | 20 / 20 |"]
  assert "| m | yarn | 64 | 2 | 0.300 +- 0.424 [0.00, 0.60] |" in text  # 0.60 and 0.00
  assert sorted(r["trials"] for r in drawn) == [20, 20, 20]


def test_distance_figure_draws_each_cell_at_its_needles_distance(tmp_path, tiny_config,
                                                               monkeypatch):
  config, model = _model("rope", tiny_config, layers=1)
  _fake_run(monkeypatch, config, model)
  opts = types.SimpleNamespace(runs="runs/fake", lengths="x4,x6", depths="0,0.5,1", trials=2,
                               distractors=2, variants="none", split="test", seed=0,
                               out=str(tmp_path))
  rows = eval_needle.run_grid(opts, log=lambda *_: None)
  for r in rows:  # recorded with the row, so the figure needs no run dir
    assert r["distance"] == needle.distance_back(ENCODE, r["length"], r["depth"])
  older = {k: v for k, v in rows[0].items() if k != "distance"}  # a row from before the field
  gone = {**older, "run_dir": "runs/gone", "run": "gone", "group": "gone"}
  moved = {**rows[0], "run_dir": "runs/moved"}

  def read_config(run_dir):
    if run_dir != "runs/fake":
      raise FileNotFoundError("no config.json there")
    return config
  monkeypatch.setattr(eval_needle.checkpoint, "read_config", read_config)
  said = []
  distance_of = eval_needle.distance_function(rows + [gone], log=said.append)
  assert distance_of(gone) is None and len(said) == 1 and "runs/gone" in said[0]
  assert eval_needle.distance_function([moved], log=said.append)(moved) == rows[0]["distance"]
  assert len(said) == 1  # runs/moved is never read: its row carries the distance
  eval_needle.write_report(str(tmp_path), rows + [gone], distance_of)
  assert (tmp_path / "needle_by_distance.png").exists()
  # at 96 the middle depth is missing: its line breaks there instead of bridging the gap
  kept = [r for r in rows if (r["length"], r["depth"]) != (96, 0.5)]
  drawn = plots.needle_distance_figure(kept, distance_of, str(tmp_path / "d.png"))
  assert set(drawn) == {(rows[0]["group"], "none", n) for n in (64, 96)}
  for (_, _, length), (xs, ys) in drawn.items():
    depths = (1.0, 0.5, 0.0) if length == 64 else (1.0, None, 0.0)  # nearest needle first
    ex = {d: needle.make_example(FILLER, ENCODE, length, d, np.random.default_rng(0))
          for d in depths if d is not None}
    cell = {r["depth"]: r["accuracy"] for r in rows if r["length"] == length}
    want_x = [ex[d]["answer_at"] - ex[d]["needle_at"] if d is not None else np.nan for d in depths]
    np.testing.assert_array_equal(xs, want_x)
    np.testing.assert_array_equal(ys, [cell.get(d, np.nan) for d in depths])
    assert np.all(np.diff([x for x in xs if x == x]) > 0)


def _grid_opts(out, trials):
  return types.SimpleNamespace(runs="runs/fake", lengths="x6", depths="0.5", trials=trials,
                               distractors=2, variants="none", split="test", seed=0,
                               out=str(out))


def test_killed_cell_resumes_from_its_last_trial(tmp_path, tiny_config, monkeypatch):
  """A cell killed after two of four trials scores only the other two when rerun and ends
  equal to an uninterrupted cell; asking the cell for six trials later scores two more,
  its first four unchanged."""
  config, model = _model("rope", tiny_config, layers=1)
  _fake_run(monkeypatch, config, model)
  whole = eval_needle.run_grid(_grid_opts(tmp_path / "whole", 4), log=lambda *_: None)[0]
  scored, real = [], needle.score_example

  def killed_after(n):
    def score(*a, **k):
      if len(scored) == n:
        raise KeyboardInterrupt
      scored.append(1)
      return real(*a, **k)
    return score
  monkeypatch.setattr(needle, "score_example", killed_after(2))
  with pytest.raises(KeyboardInterrupt):
    eval_needle.run_grid(_grid_opts(tmp_path / "cut", 4), log=lambda *_: None)
  assert not (tmp_path / "cut" / "needle.jsonl").exists()
  monkeypatch.setattr(needle, "score_example", killed_after(100))
  resumed = eval_needle.run_grid(_grid_opts(tmp_path / "cut", 4), log=lambda *_: None)[0]
  assert len(scored) == 4  # 2 before the kill + the 2 missing ones
  fields = ("accuracy", "ci", "mean_rank", "token_accuracy", "trial_exact", "trial_rank")
  assert {f: resumed[f] for f in fields} == {f: whole[f] for f in fields}
  more = eval_needle.run_grid(_grid_opts(tmp_path / "cut", 6), log=lambda *_: None)
  six = [r for r in more if r["trials"] == 6][0]
  assert len(scored) == 6 and six["trial_exact"][:4] == whole["trial_exact"]
  assert six["trial_rank"][:4] == whole["trial_rank"]


def test_a_cell_split_across_two_processes_equals_the_cell_scored_in_one(tmp_path, tiny_config,
                                                                         monkeypatch):
  """`--trials=2` and `--trials=4 --first_trial=2` into one --out score each trial once; the
  second writes no row while trials 0-1 are missing from the log it read, and a plain
  `--trials=4` then writes the row from the log alone, equal to one process's."""
  config, model = _model("rope", tiny_config, layers=1)
  _fake_run(monkeypatch, config, model)
  whole = eval_needle.run_grid(_grid_opts(tmp_path / "whole", 4), log=lambda *_: None)[0]
  scored, real = [], needle.score_example
  monkeypatch.setattr(needle, "score_example", lambda *a, **k: scored.append(1) or real(*a, **k))
  split = tmp_path / "split"
  late = types.SimpleNamespace(**{**vars(_grid_opts(split, 4)), "first_trial": 2})
  assert eval_needle.run_grid(late, log=lambda *_: None) == [] and len(scored) == 2
  eval_needle.run_grid(_grid_opts(split, 2), log=lambda *_: None)
  assert len(scored) == 4
  row = [r for r in eval_needle.run_grid(_grid_opts(split, 4), log=lambda *_: None)
         if r["trials"] == 4][0]
  assert len(scored) == 4  # the row came from the trial log
  fields = ("accuracy", "ci", "mean_rank", "token_accuracy", "trial_exact", "trial_rank")
  assert {f: row[f] for f in fields} == {f: whole[f] for f in fields}
  with pytest.raises(ValueError, match="first_trial=4: must lie in 0..3"):
    eval_needle.run_grid(types.SimpleNamespace(**{**vars(late), "first_trial": 4}))


def test_append_row_keeps_the_next_row_whole_after_a_torn_line(tmp_path, capsys):
  path = tmp_path / "log.jsonl"
  path.write_text('{"a": 1}\n{"b": 2')  # killed mid-line
  results.append_row(str(path), {"c": 3})
  results.append_row(str(path), {"d": float("nan")})
  assert results.read_rows(str(path)) == [{"a": 1}, {"c": 3}, {"d": None}]
  assert "log.jsonl:2 is not valid JSON" in capsys.readouterr().err


def test_across_seeds_averages_depths_then_seeds():
  """Per seed the depths are averaged first, then mean / sd (ddof 1) / range over seeds;
  a group with one seed, and rows that are not ok, are left out."""
  def row(run, group, depth, acc, rank, length=256, status="ok"):
    return {"run": run, "run_dir": f"runs/{run}", "group": group, "variant": "none",
            "length": length, "depth": depth, "accuracy": acc, "mean_rank": rank,
            "status": status}
  rows = [row("rope-s0", "rope", 0, 1.0, 1.0), row("rope-s0", "rope", 1, 0.5, 2.0),  # 0.75
          row("rope-s1", "rope", 0, 0.25, 3.0), row("rope-s1", "rope", 1, 0.25, 5.0),  # 0.25
          row("rope-s2", "rope", 0, 0.5, 2.0), row("rope-s2", "rope", 1, 0.5, 2.0),  # 0.5
          row("rope-s2", "rope", 0, 0.0, 9.0, length=512, status="skipped"),
          row("alibi-s0", "alibi", 0, 0.4, 1.0)]
  summary = needle.across_seeds(rows)
  assert list(summary) == [("rope", "none")]
  s = summary[("rope", "none")][256]
  assert s["seeds"] == 3 and s["accuracy"] == pytest.approx(0.5)
  assert s["accuracy_sd"] == pytest.approx(0.25)
  assert (s["accuracy_min"], s["accuracy_max"]) == (0.25, 0.75)
  assert s["rank"] == pytest.approx((1.5 + 4.0 + 2.0) / 3)
  assert 512 not in summary[("rope", "none")]
  text = "\n".join(eval_needle._across_seeds_lines(summary))
  assert "| rope | none | 256 | 3 | 0.500 +- 0.250 [0.25, 0.75] |" in text



def test_bad_lengths_and_depths_are_clear_errors_before_any_run_is_read(tmp_path, monkeypatch):
  monkeypatch.setattr(eval_needle.checkpoint, "read_config",
                      lambda _: pytest.fail("a run was read before the options were checked"))
  opts = types.SimpleNamespace(runs="runs/fake", lengths="x2", depths="0,1.5", trials=2,
                               distractors=2, variants="none", split="test", seed=0,
                               out=str(tmp_path))
  with pytest.raises(ValueError, match=r"--depths must lie in \[0, 1\].*\[1.5\]"):
    eval_needle.run_grid(opts)
  with pytest.raises(ValueError, match="--depths: 'half' is not a depth"):
    eval_needle.run_grid(types.SimpleNamespace(**{**vars(opts), "depths": "0,half"}))
  with pytest.raises(ValueError, match="--lengths: 'abc' is not a token count or xF"):
    needle.parse_lengths("1024,abc", 128)
  assert needle.parse_lengths("x0.5, 4096", 128) == [64, 4096]


def test_the_default_grid_is_the_issues_for_runs_and_for_checkpoints():
  # issue 13: 0.5x-64x the training length for byte runs, 1k-32k for a pretrained checkpoint
  assert needle.parse_lengths("grid", 128) == [64, 128, 256, 512, 1024, 2048, 4096, 8192]
  assert needle.parse_lengths("grid", 8192, checkpoint=True) == [
      1024, 2048, 4096, 8192, 16384, 32768]
  assert needle.parse_lengths(" grid", 100) == needle.parse_lengths("x0.5,x1,x2,x4,x8,"
                                                                    "x16,x32,x64", 100)
  assert needle.run_lengths("grid", "pretrained:smollm2-135m", 8192)[-1] == 32768
  assert needle.run_lengths("grid", "runs/fake", 8192)[-1] == 64 * 8192


def test_cell_keeps_each_trials_outcome(tiny_config):
  """The row's per-trial outcomes are the trials themselves: they add up to the cell's
  accuracy and mean rank, and trial t is the example seeded by (seed, length, depth, t)."""
  _, model = _model("rope", tiny_config, layers=1)
  row = needle.evaluate_cell(model, FILLER, ENCODE, 96, 0.5, trials=3, seed=1, distractors=2)
  assert len(row["trial_exact"]) == len(row["trial_rank"]) == 3
  assert sum(row["trial_exact"]) / 3 == row["accuracy"]
  assert np.mean(row["trial_rank"]) == pytest.approx(row["mean_rank"])
  rng = np.random.default_rng([1, 96, 500, 2])
  exact, rank, _ = needle.score_example(model, needle.make_example(FILLER, ENCODE, 96, 0.5, rng, 2))
  assert (row["trial_exact"][2], row["trial_rank"][2]) == (int(exact), rank)


def test_mcnemar_exact_p_is_the_two_sided_sign_test():
  assert needle.mcnemar_exact_p(0, 0) == 1.0
  assert needle.mcnemar_exact_p(3, 3) == 1.0
  assert needle.mcnemar_exact_p(5, 0) == pytest.approx(2 / 32)  # 5 of 5 discordant one way
  assert needle.mcnemar_exact_p(1, 6) == needle.mcnemar_exact_p(6, 1) == pytest.approx(
      2 * (1 + 7) / 128)
  assert needle.mcnemar_exact_p(0, 20) < 1e-5


def test_paired_trials_pairs_only_rows_scored_on_the_same_examples():
  def row(variant, exact, ranks, depth=0.5, seed=0, **extra):
    return {"run": "m", "run_dir": "runs/m", "variant": variant, "length": 64, "depth": depth,
            "seed": seed, "trials": len(exact), "distractors": 9, "split": "test",
            "status": "ok", "trial_exact": exact, "trial_rank": ranks, **extra}
  rows = [row("yarn", [1, 1, 0, 0, 1], [1, 1, 2, 1, 1]),
          row("self_extend", [1, 1, 1, 1, 0], [1, 1, 1, 1, 3]),
          row("none", [0, 0, 0, 0, 0], [5] * 5, depth=0.0),       # another cell: no pair
          row("none", [1, 0, 1, 0, 1], [1] * 5, seed=1),          # other examples: no pair
          row("none", [1, 1, 1, 1, 1], [1] * 5, eval_dtype="float32"),  # other dtype
          row("ntk", [1] * 5, [1] * 5) | {"status": "skipped: x"}]  # not ok: no pair
  pairs = needle.paired_trials(rows)
  assert len(pairs) == 1
  q = pairs[0]
  assert (q["a"], q["b"]) == ("self_extend", "yarn")
  assert (q["both"], q["only_a"], q["only_b"], q["neither"]) == (2, 2, 1, 0)
  assert q["p"] == pytest.approx(needle.mcnemar_exact_p(2, 1))
  assert (q["first_a"], q["first_b"]) == (4, 4)
  text = "\n".join(eval_needle._paired_lines(pairs))
  assert "| m | 64 | 0.5 | 5 | self_extend | yarn | 2 | 2 | 1 | 0 | 1.000 | 4 / 4 |" in text


def test_pairs_summed_over_a_lengths_depths_count_every_trial_once():
  def row(variant, depth, exact, length=64, seed=0):
    return {"run": "m", "run_dir": "runs/m", "variant": variant, "length": length,
            "depth": depth, "seed": seed, "trials": len(exact), "distractors": 9,
            "split": "test", "status": "ok", "trial_exact": exact, "trial_rank": [1] * len(exact)}
  rows = [row("yarn", 0.0, [1, 0, 0]), row("self_extend", 0.0, [1, 1, 1]),
          row("yarn", 1.0, [0, 0, 1, 1]), row("self_extend", 1.0, [1, 1, 1, 0]),
          row("yarn", 0.5, [0] * 3),                      # one variant only: not summed
          row("yarn", 0.0, [1] * 3, length=128), row("self_extend", 0.0, [0] * 3, length=128),
          row("yarn", 0.0, [0] * 3, seed=1), row("self_extend", 0.0, [1] * 3, seed=1),
          row("yarn", 1.0, [0, 0]), row("self_extend", 1.0, [1, 1])]  # 1.0's first 2 again
  pairs = needle.paired_trials(rows)
  pooled = needle.paired_over_depths(pairs)
  assert needle.paired_over_depths(pairs[::-1]) == pooled  # the larger 1.0 pair, either order
  assert len(pooled) == 1  # 128 and seed 1 have one paired depth each
  q = pooled[0]
  assert (q["length"], q["depths"], q["trials"]) == (64, [0.0, 1.0], 7)
  assert (q["both"], q["only_a"], q["only_b"], q["neither"]) == (2, 4, 1, 0)
  assert q["p"] == pytest.approx(needle.mcnemar_exact_p(4, 1))
  text = "\n".join(eval_needle._paired_lines(needle.paired_trials(rows)))
  assert "| m | 64 | 0, 1 | 7 | self_extend | yarn | 2 | 4 | 1 | 0 | 0.375 | 7 / 7 |" in text
  assert eval_needle._p_text(needle.mcnemar_exact_p(0, 20)) == "1.9e-06"
