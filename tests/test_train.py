"""End-to-end training: every encoding and task runs; resume is exact; failures are clear."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import input_pipeline
import posenc
import train
from training import checkpoint
from training.steps import split_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(workdir):
  _, model = checkpoint.load_run(workdir)
  return split_model(model)[1]


def _assert_same_params(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _losses(workdir, key="train/loss"):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r[key] for r in map(json.loads, f) if key in r]


@pytest.mark.parametrize("name", posenc.names())
def test_each_encoding_trains_on_books(name, tiny_config, tmp_path):
  config = tiny_config(posenc=name, data="books", num_train_steps=2, checkpoint_every=2,
                       eval_every=2)
  train.train_and_evaluate(config, str(tmp_path))
  losses = _losses(str(tmp_path), "eval/loss")
  assert len(losses) == 1 and np.isfinite(losses[0])
  assert checkpoint.manager(str(tmp_path)).latest_step() == 2


@pytest.mark.parametrize("data", ["markov", "copy", "passkey"])
def test_each_synthetic_task_trains(data, tiny_config, tmp_path):
  train.train_and_evaluate(tiny_config(data=data), str(tmp_path))
  assert all(np.isfinite(_losses(str(tmp_path))))


def test_loss_falls_well_below_start_on_an_easy_task(tiny_config, tmp_path):
  config = tiny_config(data="markov", num_train_steps=40, log_every=1, eval_every=40,
                       checkpoint_every=40, **{"data.markov.order": 1, "data.markov.alpha": 0.1})
  train.train_and_evaluate(config, str(tmp_path))
  losses = _losses(str(tmp_path))
  assert losses[0] > 0.9 * np.log(16)  # uniform over the 16 symbols at init
  floor = input_pipeline.get_task(config.data, config.seed).entropy_rate()
  assert floor < 0.5 * losses[0]  # the optimum is far below the start ...
  assert np.mean(losses[-5:]) < 0.75 * losses[0]  # ... and training heads there fast


def _resume_config(tiny_config, steps=6):
  return tiny_config(data="copy", num_train_steps=steps, checkpoint_every=2, log_every=1,
                     eval_every=steps, **{"model.dropout": 0.1})


def test_resume_gives_the_same_parameters_as_an_uninterrupted_run(tiny_config, tmp_path):
  whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
  train.train_and_evaluate(_resume_config(tiny_config), whole)
  train.train_and_evaluate(_resume_config(tiny_config), parts, stop_after=3)
  assert checkpoint.manager(parts).latest_step() == 3
  train.train_and_evaluate(_resume_config(tiny_config), parts)
  _assert_same_params(_params(whole), _params(parts))
  assert _losses(whole)[3:] == _losses(parts)[3:]


def _cli(config, workdir):
  overrides = {"model.num_layers": 1, "model.d_model": 32, "model.num_heads": 2,
               "batch_size": 4, "num_train_steps": config.num_train_steps, "checkpoint_every": 2,
               "log_every": 1, "eval_every": config.eval_every, "eval_tokens": config.eval_tokens, "optim.warmup_steps": 1,
               "data.num_eval_sequences": 4, "model.dropout": 0.1}
  return ([sys.executable, "train.py", "--config=configs/default.py:posenc=rope,data=copy,train_len=32",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()])


def test_sigkill_then_rerun_matches_uninterrupted(tiny_config, tmp_path):
  whole, killed = str(tmp_path / "whole"), str(tmp_path / "killed")
  steps = 30  # long enough that the kill lands mid-run, after the first checkpoint
  train.train_and_evaluate(_resume_config(tiny_config, steps), whole)
  cmd = _cli(_resume_config(tiny_config, steps), killed)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  while not os.path.isdir(os.path.join(killed, "checkpoints", "2")) and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert 2 <= checkpoint.manager(killed).latest_step() < steps  # killed mid-run
  subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True)
  _assert_same_params(_params(whole), _params(killed))


def test_incompatible_workdir_is_an_error(tiny_config, tmp_path):
  train.train_and_evaluate(tiny_config(num_train_steps=2), str(tmp_path))
  with pytest.raises(ValueError, match="holds a run with a different config .*model.d_model"):
    train.train_and_evaluate(tiny_config(num_train_steps=2, **{"model.d_model": 64}), str(tmp_path))
  # bookkeeping fields may change: extending a run is allowed
  train.train_and_evaluate(tiny_config(num_train_steps=4), str(tmp_path))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_config, tmp_path):
  config = tiny_config(num_train_steps=8, checkpoint_every=2, **{"optim.learning_rate": 1e38,
                                                                 "optim.grad_clip": 1e38})
  with pytest.raises(train.NonFiniteLossError, match="non-finite loss .* last good checkpoint"):
    train.train_and_evaluate(config, str(tmp_path))
  step = checkpoint.manager(str(tmp_path)).latest_step()
  assert step is not None and step < 8
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(_params(str(tmp_path))))


def test_init_from_records_source_and_starts_from_its_parameters(tiny_config, tmp_path):
  source, target = str(tmp_path / "source"), str(tmp_path / "target")
  train.train_and_evaluate(tiny_config(num_train_steps=2), source)
  config = tiny_config(num_train_steps=2, init_from=source, init_variant="linear")
  train.train_and_evaluate(config, target, stop_after=0)
  with open(os.path.join(target, "init_from.json")) as f:
    record = json.load(f)
  assert record == {"init_from": os.path.abspath(source), "variant": "linear", "source_step": 2}


def test_missing_checkpoint_is_a_clear_error(tmp_path, tiny_config):
  with pytest.raises(FileNotFoundError, match="not a lenx run directory"):
    checkpoint.load_run(str(tmp_path))


def test_model_options_train(tiny_config, tmp_path):
  # LayerNorm, GELU MLP, bf16 matmuls with f32 accumulation, untied head, dropout
  config = tiny_config(**{"model.norm": "layernorm", "model.mlp": "gelu",
                          "model.dtype": "bfloat16", "model.tie_embeddings": False,
                          "model.dropout": 0.1})
  train.train_and_evaluate(config, str(tmp_path))
  params = _params(str(tmp_path))
  assert "head" in params and all(np.isfinite(_losses(str(tmp_path))))


@pytest.mark.parametrize("name,dropout", [("rope", 0.0), ("t5_bias", 0.1)])
def test_remat_gives_the_same_gradients_in_less_memory(name, dropout):
  """model.remat recomputes each block in the backward pass: same loss and gradients
  (to float32 rounding; encoding parameters and dropout included), and the compiled
  step's scratch memory shrinks."""
  from configs.common import resolve
  from configs.default import get_config
  from models import build_model
  from training.steps import batch_nll

  def grads_and_temp(remat):
    c = get_config(f"posenc={name},train_len=256,data=copy")
    c.model.update(num_layers=6, d_model=64, num_heads=4, remat=remat, dropout=dropout)
    graphdef, params = split_model(build_model(resolve(c)))
    r = np.random.RandomState(0)
    tokens = r.randint(0, 256, (2, 256))
    batch = {"inputs": tokens, "targets": np.roll(tokens, -1, 1),
             "positions": np.broadcast_to(np.arange(256), (2, 256))}
    loss = lambda p: batch_nll(graphdef, p, batch, jax.random.key(1)).mean()
    step = jax.jit(jax.value_and_grad(loss))
    temp = step.lower(params).compile().memory_analysis().temp_size_in_bytes
    return step(params), temp

  (loss, grads), temp = grads_and_temp(False)
  (loss_r, grads_r), temp_r = grads_and_temp(True)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r)):
    np.testing.assert_allclose(g_r, g, rtol=1e-4, atol=1e-7)
  assert temp_r < 0.6 * temp, (temp_r, temp)


def _schedule(kind, steps=1000, **kw):
  from configs.default import get_config
  from training.optim import learning_rate_schedule
  cfg = get_config().optim
  cfg.update(schedule=kind, learning_rate=1e-3, warmup_steps=100, min_lr_ratio=0.1, **kw)
  f = learning_rate_schedule(cfg, steps)
  return np.array([float(f(i)) for i in range(steps + 1)])


def test_wsd_holds_the_peak_then_decays_linearly_and_cosine_is_unchanged():
  wsd, cos = _schedule("wsd", decay_fraction=0.2), _schedule("cosine")
  np.testing.assert_allclose(wsd[:101], cos[:101], rtol=1e-6)  # the same linear warmup
  np.testing.assert_allclose(wsd[100:801], 1e-3, rtol=1e-6)  # stable until the last 20 %
  np.testing.assert_allclose(np.diff(wsd[800:]), -0.9e-3 / 200, rtol=1e-4)  # linear decay
  assert wsd[-1] == pytest.approx(1e-4) and cos[-1] == pytest.approx(1e-4)
  # cosine: half-way through the decay it is at the middle of peak and end (Loshchilov & Hutter)
  assert cos[550] == pytest.approx(0.55e-3, rel=1e-3)
  assert 1.4 < wsd.sum() / cos.sum() < 1.6  # how far Adam can move a parameter (optim.py)


def test_bad_schedule_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown optim.schedule 'linear'.*cosine, wsd"):
    _schedule("linear")
  with pytest.raises(ValueError, match="decay_fraction must be in"):
    _schedule("wsd", decay_fraction=0.0)
