"""Extension variants applied at evaluation time: ReRoPE, log-n, parsing, auto factors."""
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.common import resolve
from evaluation.variants import NotApplicable, Variant, apply_variant, parse_variants
from models import build_model
from models.attention import logn_query_scale
from posenc.base import qk_dot
from extensions import piecewise
from posenc.rope import apply_rope, rope_frequencies


def _qk(s=24, seed=0):
  kq, kk = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kq, (1, s, 2, 16)), jax.random.normal(kk, (1, s, 2, 16))


def test_rerope_equals_rope_within_the_window_and_caps_beyond():
  q, k = _qk()
  inv_freq, _ = rope_frequencies(16)
  pos = jnp.arange(24)[None]
  rope = qk_dot(apply_rope(q, pos, inv_freq), apply_rope(k, pos, inv_freq))
  rot = lambda x, p: apply_rope(x, p, inv_freq)
  rerope = piecewise.scores('{"name": "rerope", "window": 8}', q, k, pos, pos, rot)
  rel = np.subtract.outer(np.arange(24), np.arange(24))
  near = rel < 8
  np.testing.assert_allclose(np.asarray(rerope)[:, :, near], np.asarray(rope)[:, :, near], atol=1e-5)
  # beyond the window every pair sees relative position exactly 8
  i, j = 20, 3
  capped = qk_dot(apply_rope(q[:, i:i + 1], jnp.array([[8]]), inv_freq),
                  apply_rope(k[:, j:j + 1], jnp.array([[0]]), inv_freq))
  np.testing.assert_allclose(rerope[0, :, i, j], capped[0, :, 0, 0], rtol=1e-5)
  assert not np.allclose(rerope[0, :, i, j], rope[0, :, i, j], atol=1e-3)


def test_logn_scaling_is_identity_up_to_train_len_then_grows():
  pos = jnp.arange(512)[None]
  scale = np.asarray(logn_query_scale(pos, 128))[0]
  np.testing.assert_array_equal(scale[:128], 1.0)  # log(p+1)/log(128) <= 1 for p <= 127
  assert scale[255] == pytest.approx(math.log(256) / math.log(128))  # = 8/7
  assert np.all(np.diff(scale[128:]) > 0)


def test_parse_variants_with_params_and_auto():
  v = parse_variants("none,linear,yarn:factor=8,beta_fast=16,dynamic:factor=auto,rerope:window=32")
  assert [x.name for x in v] == ["none", "linear", "yarn", "dynamic", "rerope"]
  assert v[2].param_dict() == {"factor": 8, "beta_fast": 16}
  assert v[2].label == "yarn:factor=8,beta_fast=16"
  assert v[3].param_dict() == {"factor": "auto"}
  with pytest.raises(ValueError, match="unknown variant 'yarm'; valid choices: dual_chunk, dynamic"):
    parse_variants("yarm")


@pytest.fixture
def rope_run(tiny_config):
  return resolve(tiny_config(posenc="rope", train_len=32))


def test_auto_factor_is_eval_len_over_train_len(rope_run):
  config = apply_variant(rope_run, Variant("yarn"), 256)
  scaling = json.loads(config.posenc.rope.scaling_json)
  assert scaling == {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32}
  linear = apply_variant(rope_run, Variant("linear", (("factor", 2.0),)), 256)
  assert json.loads(linear.posenc.rope.scaling_json)["factor"] == 2.0


def test_linear_variant_equals_rotating_at_positions_over_factor(rope_run):
  base, scaled = build_model(rope_run), build_model(
      apply_variant(rope_run, Variant("linear", (("factor", 4.0),)), 128))
  q, k = _qk(8)
  pos = jnp.arange(8)[None] * 4
  a = scaled.posenc.rotate(q, k, pos, pos)
  b = base.posenc.rotate(q, k, pos // 4, pos // 4)
  np.testing.assert_allclose(a[0], b[0], atol=1e-5)


def test_rope_variant_on_alibi_run_is_not_applicable(tiny_config):
  run = resolve(tiny_config(posenc="alibi"))
  with pytest.raises(NotApplicable, match="needs a RoPE encoding; run uses 'alibi'"):
    apply_variant(run, Variant("ntk"), 128)
  assert apply_variant(run, Variant("logn"), 128).model.logn_base_len == 32  # any encoding


def test_variants_do_not_change_parameter_shapes(rope_run):
  from training.steps import split_model
  shapes = lambda c: jax.tree.map(jnp.shape, split_model(build_model(c))[1])
  for v in parse_variants("ntk,dynamic,yarn,llama3,rerope,logn"):
    assert shapes(apply_variant(rope_run, v, 512)) == shapes(rope_run)


def test_invalid_variant_parameters_fail_clearly(rope_run):
  config = apply_variant(rope_run, Variant("yarn", (("beta_fast", 0.5),)), 128)
  with pytest.raises(ValueError, match="needs beta_fast > beta_slow"):
    build_model(config)


def test_finetune_config_starts_from_the_source_run(rope_run, tmp_path):
  from configs import finetune
  from training.checkpoint import write_config
  write_config(str(tmp_path), rope_run)
  c = resolve(finetune.get_config(f"init_from={tmp_path},train_len=128,variant=yarn,steps=50"))
  assert c.init_from == str(tmp_path) and c.init_variant == "yarn"
  assert c.train_len == 128 and c.num_train_steps == 50
  assert c.posenc.rope.original_len == 32  # frequencies stay anchored at the pre-training length
  assert json.loads(c.posenc.rope.scaling_json)["factor"] == 4.0
  assert c.batch_size * c.train_len == rope_run.batch_size * rope_run.train_len
  with pytest.raises(ValueError, match="needs init_from"):
    finetune.get_config("train_len=128")


def test_longrope_lists_parse_and_switch_above_the_original_length(rope_run):
  pairs = rope_run.model.head_dim // 2
  short, long = [1.0] * pairs, [2.0] * pairs
  spec = f"longrope:short_factor={json.dumps(short)},long_factor={json.dumps(long)}"
  (v,) = parse_variants(spec)
  assert v.param_dict() == {"short_factor": short, "long_factor": long}
  assert parse_variants(v.label)[0] == v  # labels round-trip
  at = lambda n: build_model(apply_variant(rope_run, v, n)).posenc.inv_freq
  np.testing.assert_allclose(at(32), build_model(rope_run).posenc.inv_freq, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(at(33)) * 2.0, at(32), rtol=1e-6)  # long factors
