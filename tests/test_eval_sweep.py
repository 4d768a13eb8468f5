"""The sweep end to end on the demo's smoke version (2 tiny run groups x 2 seeds trained
with train.train_and_evaluate: RoPE on books, ALiBi on passkey, plus a PI fine-tune of
each RoPE seed; lengths 16, 32; variants none, linear): outputs, skipping, resumption, a
kill between rows, --replot."""
import copy
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

import demo
import train
from configs import sweep_demo
from configs.default import get_config
from evaluation import results, sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = ("results.jsonl", "summary.md", "ppl_vs_length.png", "per_position_loss.png",
         "attention_entropy.png", "accuracy_vs_length.png")


def smoke_config(tmp):
  cfg = sweep_demo.get_config("smoke")
  cfg.train.runs_dir, cfg.out = str(tmp / "runs"), str(tmp / "results")
  return cfg


@pytest.fixture(scope="session")
def smoke(tmp_path_factory):
  cfg = smoke_config(tmp_path_factory.mktemp("demo"))
  rows = demo.run_demo(cfg)
  return cfg, rows


def rows_by_key(path, main_only=False):
  """Rows of a results file by key; main_only: without the fine-tune's rows (the sweep
  of ``cfg.runs`` alone does not produce them)."""
  return {results.row_key(r): r for r in results.read_rows(path)
          if not (main_only and r["group"] == "rope-pi32")}


def test_smoke_sweep_writes_every_output(smoke):
  cfg, rows = smoke
  for name in FILES:
    assert os.path.getsize(os.path.join(cfg.out, name)) > 0, name
  lines = open(os.path.join(cfg.out, "results.jsonl")).read().splitlines()
  # 2 groups x 2 seeds x 2 variants x 2 lengths, + fine-tune x 2 seeds x 2 lengths
  assert len(lines) == 20 == len({results.row_key(json.loads(l)) for l in lines})
  ok = [r for r in rows if r["status"] == "ok"]
  assert len(ok) == 16  # rope 8, alibi_passkey 4 (no linear), rope-pi32 4
  for r in ok:
    assert math.isfinite(r["nll"]) and r["tokens"] > 0 and r["ppl"] == pytest.approx(
        math.exp(r["nll"]))
    assert len(r["position_nll"]) == len(r["position_buckets"])
    assert len(r["attn_entropy"]) == 1 and r["compile_s"] >= 0 and r["run_s"] >= 0
    if r["data"] == "books":
      assert r["bpb"] == pytest.approx(r["nll"] / math.log(2))
    else:
      assert r["excess_nll"] == pytest.approx(r["nll"] - r["optimal_nll"])
      assert 0 <= r["answer_acc"] <= 1 and r["passkey_acc"]


def test_rope_variant_on_non_rope_run_is_skipped(smoke):
  cfg, rows = smoke
  skipped = [r for r in rows if r["status"].startswith("skipped")]
  assert {(r["run"], r["variant"]) for r in skipped} == {
      ("alibi_passkey-s0", "linear"), ("alibi_passkey-s1", "linear")}
  assert all("nll" not in r for r in skipped)
  summary = open(os.path.join(cfg.out, "summary.md")).read()
  assert "alibi_passkey-s0 + linear: linear needs a RoPE encoding" in summary


def _fake_compute(source, calls, fail_at=None):
  """Stands in for sweep._compute: returns the row the smoke sweep computed (fast)."""
  def compute(run, variant, length, opts, stride, segment_len, reference=None):
    calls.append((run.dir, variant.label, length))
    if fail_at is not None and len(calls) == fail_at:
      raise KeyboardInterrupt  # the sweep is killed while computing this row
    key = results.row_key(run.base_row(variant, length, opts, stride, segment_len))
    return {k: v for k, v in source[key].items() if k not in results.KEY_FIELDS}
  return compute


def test_resume_computes_only_missing_rows(smoke, tmp_path, monkeypatch):
  cfg = copy.deepcopy(smoke[0])
  source = rows_by_key(os.path.join(cfg.out, "results.jsonl"), main_only=True)
  kept = list(source.values())[:5]
  path = tmp_path / "results.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"run": "rope", "varia')
  calls = []
  monkeypatch.setattr(sweep, "_compute", _fake_compute(source, calls))
  cfg.out = str(tmp_path)
  sweep.run_sweep(cfg, verbose=False)
  assert len(calls) == len(source) - 5 == 11  # only the rows missing from the file
  after = rows_by_key(str(path))
  assert set(after) == set(source) and len(path.read_text().splitlines()) == len(source)
  for r in kept:
    assert after[results.row_key(r)] == r  # finished rows untouched


def test_kill_between_rows_leaves_valid_file_and_resumes(smoke, tmp_path, monkeypatch):
  cfg = copy.deepcopy(smoke[0])
  source = rows_by_key(os.path.join(cfg.out, "results.jsonl"), main_only=True)
  cfg.out = str(tmp_path)
  calls = []
  monkeypatch.setattr(sweep, "_compute", _fake_compute(source, calls, fail_at=4))
  with pytest.raises(KeyboardInterrupt):
    sweep.run_sweep(cfg, verbose=False)
  lines = (tmp_path / "results.jsonl").read_text().splitlines()
  assert len(lines) == 3 and all(json.loads(l) for l in lines)  # rows 1-3, complete
  calls.clear()
  monkeypatch.setattr(sweep, "_compute", _fake_compute(source, calls))
  sweep.run_sweep(cfg, verbose=False)
  assert len(calls) == 13 and set(rows_by_key(str(tmp_path / "results.jsonl"))) == set(source)


def _one_run_opts(cfg, tmp_path, **kw):
  opts = copy.deepcopy(cfg)
  opts.runs, opts.out = os.path.join(cfg.train.runs_dir, "rope-s0"), str(tmp_path)
  opts.update(kw)
  return opts


def test_variant_identical_to_none_reuses_its_row_and_matches_a_recompute(smoke, tmp_path):
  cfg, rows = smoke
  rope = {(r["variant"], r["length"]): r for r in rows if r["run"] == "rope-s0"}
  train_len = rope["none", 16]["train_len"]
  assert train_len == 16
  at_l, past_l = rope["linear", 16], rope["linear", 32]
  assert at_l["same_as"] == "none" and at_l["nll"] == rope["none", 16]["nll"]
  assert at_l["variant_resolved"]["linear"]["factor"] == 1.0
  assert "same_as" not in past_l and past_l["nll"] != rope["none", 32]["nll"]
  # without a "none" row to reuse, the same variant is computed: the same numbers
  alone = sweep.run_sweep(_one_run_opts(cfg, tmp_path, variants="linear"), verbose=False)
  computed = next(r for r in alone if r["length"] == 16)
  assert "same_as" not in computed
  assert computed["nll"] == pytest.approx(at_l["nll"], abs=1e-6)
  # "none" listed last is still computed first, so the identical variant reuses it
  later = sweep.run_sweep(_one_run_opts(cfg, tmp_path / "later", variants="linear,none",
                                        lengths="16"), verbose=False)
  assert [r.get("same_as") for r in later if r["variant"] == "linear"] == ["none"]


def test_dtype_override_is_recorded_keyed_and_validated(smoke, tmp_path):
  cfg, rows = smoke
  own = next(r for r in rows if (r["run"], r["variant"], r["length"]) == ("rope-s0", "none", 32))
  assert own["dtype"] == "float32" and "eval_dtype" not in own  # the smoke runs' own dtype
  for dtype in ("bfloat16", "float32"):
    sweep.run_sweep(_one_run_opts(cfg, tmp_path, variants="none", lengths="32", dtype=dtype),
                    verbose=False)
  got = {r["eval_dtype"]: r for r in results.read_rows(str(tmp_path / "results.jsonl"))}
  assert set(got) == {"bfloat16", "float32"} and got["bfloat16"]["dtype"] == "bfloat16"
  assert got["float32"]["nll"] == pytest.approx(own["nll"], abs=1e-6)
  assert got["bfloat16"]["nll"] != got["float32"]["nll"]  # really evaluated in bf16 ...
  assert got["bfloat16"]["nll"] == pytest.approx(own["nll"], abs=0.02)  # ... and close
  with pytest.raises(ValueError, match="float16.*valid choices"):
    sweep.run_sweep(_one_run_opts(cfg, tmp_path, dtype="float16"), verbose=False)


def test_replot_from_results_only(smoke, tmp_path):
  cfg, _ = smoke
  shutil.copy(os.path.join(cfg.out, "results.jsonl"), tmp_path / "results.jsonl")
  # The run dirs named in the config do not exist here: --replot must not need them.
  proc = subprocess.run(
      [sys.executable, "eval_extrapolate.py", "--config=configs/sweep_demo.py:smoke",
       f"--out={tmp_path}", "--replot"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for name in FILES:
    assert (tmp_path / name).stat().st_size > 0, name
  assert (tmp_path / "summary.md").read_text() == open(os.path.join(cfg.out, "summary.md")).read()


def test_learned_table_too_short_is_marked_unsupported(tmp_path):
  c = get_config("posenc=learned,train_len=16")
  c.model.num_layers, c.model.d_model, c.model.num_heads = 1, 32, 2
  c.batch_size, c.num_train_steps, c.eval_tokens = 4, 3, 256
  c.eval_every = c.checkpoint_every = c.log_every = 3
  c.posenc.learned.max_len = 16
  train.train_and_evaluate(c, str(tmp_path / "learned"))
  opts = sweep_demo.get_config("smoke")
  opts.runs, opts.variants, opts.out = str(tmp_path / "learned"), "none", str(tmp_path / "out")
  rows = {r["length"]: r for r in sweep.run_sweep(opts, verbose=False)}
  assert rows[16]["status"] == "ok"
  assert rows[32]["status"].startswith("unsupported: ") and "0..15" in rows[32]["status"]
  assert "n/a*" in (tmp_path / "out" / "summary.md").read_text()


def test_samples_continue_the_same_passage_at_each_multiple(smoke):
  from evaluation import samples
  cfg, _ = smoke
  run = os.path.join(cfg.train.runs_dir, "rope-s0")
  text = samples.samples_markdown([run], at=5000, new_tokens=4)
  assert "train_len 16" in text
  blocks = [b for b in text.split("```")[1::2]]
  assert len(blocks) == 3  # 1x, 4x, 16x
  shown = sorted((b[1:].split(" >>>")[0] for b in blocks), key=len)  # b[0]: the fence newline
  assert all(shown[-1].endswith(p) for p in shown)  # every prompt ends at the same text
  for k, n in zip((1, 4, 16), (16, 64, 256)):
    assert f"**{k}x ({n} bytes of prompt" in text


def test_sample_command_line_with_dashed_flags(smoke):
  """``python sample.py`` as a user types it (flags spelled with dashes, as in the issues):
  it runs and prints the JSON it promises (a script importing another's flags once crashed
  here with absl's DuplicateFlagError)."""
  cfg, _ = smoke
  proc = subprocess.run(
      [sys.executable, "sample.py", f"--run={os.path.join(cfg.train.runs_dir, 'rope-s0')}",
       "--prompt=It was the best of times", "--max-new-tokens=5", "--temperature=0", "--json"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["new_tokens"] == 5 and out["prompt_tokens"] == len("It was the best of times")


def test_sample_dtype_override(smoke):
  import numpy as np
  import sample
  cfg, _ = smoke
  run, prompt = os.path.join(cfg.train.runs_dir, "rope-s0"), np.arange(65, 97, dtype=np.int32)
  _, own, _ = sample.continuation(run, prompt, max_new_tokens=6, temperature=0.0)
  conf, f32, _ = sample.continuation(run, prompt, max_new_tokens=6, temperature=0.0,
                                     dtype="float32")
  assert conf.model.dtype == "float32" and (f32 == own).all()  # the smoke run's own dtype
  conf, _, _ = sample.continuation(run, prompt, max_new_tokens=6, temperature=0.0,
                                   dtype="bfloat16")
  assert conf.model.dtype == "bfloat16"
  with pytest.raises(ValueError, match="float16.*valid choices"):
    sample.continuation(run, prompt, max_new_tokens=2, dtype="float16")


def test_samples_rerun_replaces_its_sections_and_keeps_the_others():
  from evaluation import samples
  head = ["# T", ""]
  old = samples.merge("", [("## a (x, train_len 1)", "A1"), ("## b (y, train_len 1)", "B1")], head)
  new = samples.merge(old, [("## b (y, train_len 1)", "B2"), ("## c (z, train_len 1)", "C")], head)
  assert new.index("A1") < new.index("B2") < new.index("C") and "B1" not in new
  assert samples.merge(new, [], head) == new  # a rerun with nothing new changes nothing


def test_bad_lengths_are_a_clear_error():
  assert sweep.parse_lengths("256,128, 128") == [128, 256]
  for bad in ("12x", "0,128", ""):
    with pytest.raises(ValueError, match="--lengths must be positive integers"):
      sweep.parse_lengths(bad)
