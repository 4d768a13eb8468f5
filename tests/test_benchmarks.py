"""benchmarks/: the ratios summarize_side_by_side.py quotes, what step_memory.py,
generate_speed.py and needle_trial.py print on a tiny model, and kernel_sources.py's A/B."""
import json

import pytest

from benchmarks.summarize_side_by_side import parse, table


def _rope_run(tiny_config, train_len=16):
  """(config, model) of a tiny RoPE run: what a benchmark's ``checkpoint.load_run`` returns."""
  from configs.common import resolve
  from models import build_model
  config = resolve(tiny_config(posenc="rope", train_len=train_len))
  return config, build_model(config)


def _line(name, tokens_per_s, rss=500.0):
  return f"{name} " + json.dumps({"tokens_per_s": tokens_per_s, "peak_rss_mib": rss})


def test_ratio_of_means_and_per_repeat_pairs():
  log = ["cpu " + json.dumps({"model": "X", "flags": ["avx2"]}), "## train A repeat 1",
         _line("peer_train_A", 100.0), _line("lenx_train_A_float32", 150.0, 600.0),
         _line("lenx_train_A_bfloat16", 300.0), "## train A repeat 2",
         _line("peer_train_A", 300.0), _line("lenx_train_A_float32", 250.0, 700.0),
         _line("lenx_train_A_bfloat16", 300.0)]
  runs, cpu = parse(log)
  assert cpu == {"model": "X", "flags": ["avx2"]}
  rows = {line.split(" | ")[1]: line for line in table(runs).splitlines()[2:]}
  # float32: means 200 vs 200 -> 1.00x; repeats 150/100 = 1.50 and 250/300 = 0.83
  assert "**1.00x** (0.83-1.50)" in rows["float32"] and "500 / 600-700" in rows["float32"]
  assert "**1.50x** (1.00-3.00)" in rows["bfloat16"]


def test_step_memory_reports_the_compiled_scratch(capsys):
  """benchmarks/step_memory.py: one JSON line per call; a train step needs more scratch
  than an eval step of the same shape, and --mlp-chunk reaches the model."""
  from benchmarks import step_memory
  shape = ["--layers", "1", "--d-model", "32", "--heads", "2", "--ffn", "64", "--seq-len", "64",
           "--batch", "1", "--dtype", "float32"]
  out = {}
  for mode in ("eval", "train"):
    step_memory.main(["--mode", mode, "--mlp-chunk", "16"] + shape)
    out[mode] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["eval"]["mode"] == "eval" and out["eval"]["mlp_chunk"] == 16
  assert 0 < out["eval"]["temp_mib"] < out["train"]["temp_mib"]


def test_generate_speed_prints_the_cpu_and_one_line_per_context_and_mode(
    capsys, monkeypatch, tiny_config):
  """benchmarks/generate_speed.py on a checkpoint (here a tiny model): --dtype reaches the
  model, every (context, mode) gets a positive tokens/s."""
  from benchmarks import generate_speed
  from evaluation import runner
  seen = {}
  def load_run(spec):
    seen["spec"] = spec
    return _rope_run(tiny_config)
  monkeypatch.setattr(generate_speed.checkpoint, "load_run", load_run)
  real = runner.variant_model
  monkeypatch.setattr(runner, "variant_model",
                      lambda m, c, d: seen.setdefault("dtype", d) and real(m, c, d))
  generate_speed.main(["--run", "pretrained:x", "--context", "8,16", "--new", "3",
                       "--dtype", "bfloat16", "--modes", "cached,uncached,prefill"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith("cpu {") and seen == {"spec": "pretrained:x", "dtype": "bfloat16"}
  speeds = [float(line.split()[-2]) for line in lines[1:]]
  assert [line.split(": ")[1].split()[0] for line in lines[1:]] == ["cached", "uncached",
                                                                    "prefill"] * 2
  assert len(speeds) == 6 and min(speeds) > 0


def test_generate_speed_decodes_the_variant_asked_for(capsys, monkeypatch, tiny_config):
  """--variant reaches the decoded model: dynamic NTK (the cache keeps keys unrotated and
  re-rotates them every step), set up for the longest context plus the new tokens."""
  from benchmarks import generate_speed
  from evaluation import runner
  monkeypatch.setattr(generate_speed.checkpoint, "load_run", lambda spec: _rope_run(tiny_config))
  built = []
  real = runner.variant_model
  monkeypatch.setattr(runner, "variant_model",
                      lambda m, c, d: built.append(real(m, c, d)) or built[-1])
  generate_speed.main(["--run", "pretrained:x", "--context", "8,24", "--new", "3",
                       "--modes", "cached", "--variant", "dynamic:factor=2"])
  assert len(built) == 1 and built[0].posenc.length_dependent
  assert len(capsys.readouterr().out.strip().splitlines()) == 3


def test_needle_trial_scores_one_trial_either_way_and_prints_the_cpu(capsys, monkeypatch,
                                                                    tiny_config):
  """benchmarks/needle_trial.py: the ``peek`` and ``branch`` candidates give the same trial
  outcome (the same step, in place or on a copy), each line names the CPU and a peak RSS."""
  import numpy as np
  from benchmarks import needle_trial
  run = _rope_run(tiny_config, train_len=64)
  monkeypatch.setattr(needle_trial.checkpoint, "load_run", lambda spec: run)
  text = np.frombuffer(b"It was a bright cold day in April. " * 40, np.uint8).astype(np.int32)
  monkeypatch.setattr(needle_trial.needle, "filler_tokens", lambda *_: text)
  lines = []
  for way in ("peek", "branch"):
    needle_trial.main(["--run", "pretrained:x", "--length", "128", "--candidates", way,
                       "--dtype", "float32"])
    lines.append(capsys.readouterr().out.strip())
  assert all("'flags'" in line and "peak RSS" in line for line in lines)
  assert [line.split("exact")[1].split(";")[0] for line in lines] == \
      [lines[0].split("exact")[1].split(";")[0]] * 2


def test_kernel_sources_times_each_part_of_both_sources_and_compares_outputs(capsys):
  """The same source as a and b: every part timed in both, identical outputs (0 difference);
  an unknown part and a missing source are clear errors."""
  from benchmarks import kernel_sources
  from models import cpu_attention
  kernel_sources.main(["--a", cpu_attention.SOURCE, "--length", "64", "--heads", "2",
                       "--dim", "16", "--repeats", "1", "--rounds", "1"])
  lines = capsys.readouterr().out.splitlines()
  assert lines[0].startswith("cpu ") and "flags" in lines[0]
  for part in kernel_sources.PARTS:
    row = next(line for line in lines if line.startswith(part + ":"))
    assert "a / b" in row and row.endswith("max |a - b| / max |b| 0.0e+00")
  with pytest.raises(ValueError, match="valid: bf16"):
    kernel_sources.main(["--a", cpu_attention.SOURCE, "--parts", "fp8"])
  with pytest.raises(FileNotFoundError, match="does not exist"):
    kernel_sources.main(["--a", "/nonexistent/kernel.cc"])
