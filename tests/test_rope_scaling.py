"""Tests for posenc/rope_scaling.py (numpy only; no torch needed).

``fixtures/hf_rope_reference.json`` is produced by ``fixtures/make_hf_rope_reference.py`` with Hugging
Face transformers (version recorded in the JSON).  Hand-computed values use tiny head dims so the
arithmetic fits in a comment.
"""
import json
import math
import os

import numpy as np
import pytest

from posenc.rope_scaling import ROPE_TYPES, rope_frequencies, validate_rope_scaling

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf_rope_reference.json")
with open(FIXTURE) as _f:
  REFERENCE = json.load(_f)


def _type(scaling):
  scaling = scaling or {}
  return scaling.get("rope_type", scaling.get("type", "default"))


def default(head_dim=128, base=10000.0):
  return rope_frequencies(head_dim, base)[0].astype(np.float64)


# ---------------------------------------------------------------- HF reference values
def test_reference_metadata():
  assert REFERENCE["transformers_version"].startswith("5.")
  assert len(REFERENCE["cases"]) >= 200
  assert {_type(c["scaling"]) for c in REFERENCE["cases"]} == set(ROPE_TYPES) - {"ntk"}


@pytest.mark.parametrize("i", range(len(REFERENCE["cases"])))
def test_matches_hf(i):
  c = REFERENCE["cases"][i]
  inv, att = rope_frequencies(c["head_dim"], c["base"], c["scaling"], c["seq_len"], c["max_position_embeddings"])
  assert inv.dtype == np.float32 and isinstance(att, float)
  np.testing.assert_allclose(inv, np.asarray(c["inv_freq"], np.float32), rtol=1e-6, atol=0, err_msg=c["note"])
  assert att == pytest.approx(c["attention_factor"], rel=1e-12)


# ---------------------------------------------------------------- hand-computed numbers
def test_hand_default():
  # d=4, base 1e4: theta_i = 1e4^(-2i/4) = [1e4^0, 1e4^-0.5] = [1, 0.01]
  inv, att = rope_frequencies(4, 10000.0)
  np.testing.assert_allclose(inv, [1.0, 0.01], rtol=1e-7)
  assert att == 1.0 and inv.shape == (2,)


def test_hand_partial_rotary():
  # head_dim 16 * 0.25 = rotary_dim 4 -> same as d=4: [1, 0.01]
  inv, _ = rope_frequencies(16, 10000.0, {"rope_type": "default", "partial_rotary_factor": 0.25})
  np.testing.assert_allclose(inv, [1.0, 0.01], rtol=1e-7)


def test_hand_linear():
  # [1, 0.01] / 4 = [0.25, 0.0025]
  inv, att = rope_frequencies(4, 10000.0, {"rope_type": "linear", "factor": 4})
  np.testing.assert_allclose(inv, [0.25, 0.0025], rtol=1e-7)
  assert att == 1.0


def test_hand_ntk():
  # d=4, s=2: base' = 1e4 * 2^(4/(4-2)) = 1e4 * 4 = 4e4; theta = [1, 4e4^-0.5] = [1, 0.005]
  inv, att = rope_frequencies(4, 10000.0, {"rope_type": "ntk", "factor": 2})
  np.testing.assert_allclose(inv, [1.0, 0.005], rtol=1e-7)
  assert att == 1.0


def test_hand_dynamic():
  # d=4, s=2, L=1000, seq_len=3000: scale = 2*3000/1000 - (2-1) = 5; base' = 1e4 * 5^(4/2) = 2.5e5
  # theta = [1, 2.5e5^-0.5] = [1, 0.002]
  inv, _ = rope_frequencies(4, 10000.0, {"rope_type": "dynamic", "factor": 2}, seq_len=3000,
                              max_position_embeddings=1000)
  np.testing.assert_allclose(inv, [1.0, 0.002], rtol=1e-7)


def test_hand_yarn():
  # d=8, base 1e4, L=4096, s=4: default theta = [1, 0.1, 0.01, 0.001]
  # low  = 8*ln(4096/(32*2pi)) / (2 ln 1e4) = 8*3.0143/18.4207 = 1.309 -> floor 1
  # high = 8*ln(4096/(1*2pi))  / (2 ln 1e4) = 8*6.4799/18.4207 = 2.814 -> ceil 3
  # ramp_i = clip((i - 1)/(3 - 1)) = [0, 0, 0.5, 1]; theta' = theta/s * ramp + theta * (1 - ramp)
  # = [1, 0.1, 0.01*(0.5/4 + 0.5), 0.001/4] = [1, 0.1, 0.00625, 0.00025]
  # attention = 0.1 ln 4 + 1 = 0.1*1.3862944 + 1 = 1.13862944
  inv, att = rope_frequencies(8, 10000.0, {"rope_type": "yarn", "factor": 4,
                                             "original_max_position_embeddings": 4096})
  np.testing.assert_allclose(inv, [1.0, 0.1, 0.00625, 0.00025], rtol=1e-6)
  assert att == pytest.approx(1.13862944, rel=1e-8)


def test_hand_yarn_mscale_ratio():
  # s=40, mscale=1, mscale_all_dim=0.5: (0.1*1*ln40 + 1) / (0.1*0.5*ln40 + 1)
  # ln 40 = 3.6888795 -> 1.36888795 / 1.18444398 = 1.15572193
  _, att = rope_frequencies(64, 10000.0, {"rope_type": "yarn", "factor": 40, "mscale": 1.0,
                      "mscale_all_dim": 0.5}, max_position_embeddings=4096)
  assert att == pytest.approx(1.15572193, rel=1e-7)


def test_hand_llama3():
  # d=8, base 1e4: theta = [1, 0.1, 0.01, 0.001], wavelen = 2pi/theta = [6.28, 62.8, 628.3, 6283.2]
  # L=1000, low=1, high=4: keep wavelen < 1000/4 = 250, divide wavelen > 1000/1 = 1000 by s=8
  # i=2 blends: smooth = (1000/628.3185 - 1)/(4 - 1) = 0.5915494/3 = 0.1971831
  #   theta' = 0.01*((1 - 0.1971831)/8 + 0.1971831) = 0.01*(0.1003521 + 0.1971831) = 0.002975352
  # i=3: 0.001/8 = 0.000125
  inv, att = rope_frequencies(8, 10000.0, {"rope_type": "llama3", "factor": 8, "low_freq_factor": 1,
                                             "high_freq_factor": 4, "original_max_position_embeddings": 1000})
  np.testing.assert_allclose(inv, [1.0, 0.1, 0.002975352, 0.000125], rtol=1e-6)
  assert att == 1.0


def test_hand_longrope():
  # d=4: theta = [1, 0.01]; L=1000; short [1, 2] -> [1, 0.005]; long [4, 8] -> [0.25, 0.00125]
  # factor = max_pos / L = 4000/1000 = 4: attention = sqrt(1 + ln4/ln1000)
  #   = sqrt(1 + 1.3862944/6.9077553) = sqrt(1.2006867) = 1.0957585
  scaling = {"rope_type": "longrope", "short_factor": [1, 2], "long_factor": [4, 8],
               "original_max_position_embeddings": 1000}
  short, att = rope_frequencies(4, 10000.0, scaling, seq_len=1000, max_position_embeddings=4000)
  long_, _ = rope_frequencies(4, 10000.0, scaling, seq_len=1001, max_position_embeddings=4000)
  np.testing.assert_allclose(short, [1.0, 0.005], rtol=1e-7)
  np.testing.assert_allclose(long_, [0.25, 0.00125], rtol=1e-7)
  assert att == pytest.approx(1.0957585, rel=1e-7)


# ---------------------------------------------------------------- defining properties
@pytest.mark.parametrize("rope_type", ["linear", "ntk", "yarn", "llama3"])
def test_factor_one_is_default(rope_type):
  scaling = {"rope_type": rope_type, "factor": 1.0}
  if rope_type == "llama3":
    scaling.update(low_freq_factor=1.0, high_freq_factor=4.0)
  inv, att = rope_frequencies(128, 10000.0, scaling, max_position_embeddings=4096)
  np.testing.assert_allclose(inv, default(), rtol=1e-6)
  assert att == 1.0


@pytest.mark.parametrize("factor", [2, 4, 8, 16, 32])
def test_linear_is_default_over_factor(factor):
  inv, _ = rope_frequencies(128, 10000.0, {"rope_type": "linear", "factor": factor})
  np.testing.assert_allclose(inv, default() / factor, rtol=1e-6)


def test_ntk_interpolates_lowest_frequency_by_factor():
  # base' = b s^(d/(d-2)): the last exponent (d-2)/d turns that into exactly theta_last / s.
  inv = rope_frequencies(128, 10000.0, {"rope_type": "ntk", "factor": 8})[0].astype(np.float64)
  assert inv[0] == 1.0
  assert inv[-1] == pytest.approx(default()[-1] / 8, rel=1e-6)
  assert np.all(inv[1:] < default()[1:])


def test_dynamic_default_until_original_length_then_grows_base():
  scaling = {"rope_type": "dynamic", "factor": 4.0}
  for seq_len in (None, 1, 2048, 4096):
    inv, _ = rope_frequencies(128, 10000.0, scaling, seq_len=seq_len, max_position_embeddings=4096)
    np.testing.assert_array_equal(inv, default().astype(np.float32))
  previous = default()
  for seq_len in (4097, 8192, 65536):
    inv = rope_frequencies(128, 10000.0, scaling, seq_len=seq_len, max_position_embeddings=4096)[0]
    assert inv[0] == 1.0 and np.all(inv[1:] < previous[1:])  # larger base -> lower frequencies
    previous = inv


@pytest.mark.parametrize("factor,beta_fast,beta_slow", [(8, 32, 1), (16, 64, 2), (4, 16, 0.5)])
def test_yarn_ramp(factor, beta_fast, beta_slow):
  # r_i = L / lambda_i rotations in the original context: r > beta_fast keep theta, r < beta_slow -> theta/s
  L, ref = 4096, default()
  inv, _ = rope_frequencies(128, 10000.0, {"rope_type": "yarn", "factor": factor, "beta_fast": beta_fast,
                                             "beta_slow": beta_slow}, max_position_embeddings=L)
  rotations = L / (2 * math.pi / ref)
  fast, slow = rotations > beta_fast, rotations < beta_slow
  assert fast.sum() > 0 and slow.sum() > 0
  np.testing.assert_allclose(inv[fast], ref[fast], rtol=1e-6)
  np.testing.assert_allclose(inv[slow], ref[slow] / factor, rtol=1e-6)
  mid = ~fast & ~slow
  assert np.all(inv[mid] <= ref[mid] * (1 + 1e-6)) and np.all(inv[mid] >= ref[mid] / factor * (1 - 1e-6))


@pytest.mark.parametrize("factor", [2, 4, 8, 16, 32])
def test_yarn_default_attention_factor(factor):
  _, att = rope_frequencies(64, 10000.0, {"rope_type": "yarn", "factor": factor}, max_position_embeddings=4096)
  assert att == pytest.approx(0.1 * math.log(factor) + 1)


def test_yarn_attention_factor_overrides():
  base = {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4096}
  m = lambda s, k: 0.1 * k * math.log(s) + 1  # noqa: E731
  assert rope_frequencies(64, scaling={**base, "mscale": 0.7, "mscale_all_dim": 0.3})[1] == \
    pytest.approx(m(16, 0.7) / m(16, 0.3))
  assert rope_frequencies(64, scaling={**base, "mscale": 0.7})[1] == pytest.approx(m(16, 1))
  assert rope_frequencies(64, scaling={**base, "attention_factor": 1.5, "mscale": 2.0,
                                         "mscale_all_dim": 1.0})[1] == 1.5


def test_yarn_uses_explicit_factor_even_if_lengths_disagree():
  # HF 5.24: max_pos / original = 16 but factor 4 is used (HF only logs a warning).
  a = rope_frequencies(64, scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
                         max_position_embeddings=65536)
  b = rope_frequencies(64, scaling={"rope_type": "yarn", "factor": 4.0}, max_position_embeddings=4096)
  np.testing.assert_array_equal(a[0], b[0])
  assert a[1] == b[1] == pytest.approx(0.1 * math.log(4) + 1)


def test_llama3_bands():
  L, low, high, s = 8192, 1.0, 4.0, 8.0
  inv, _ = rope_frequencies(128, 500000.0, {"rope_type": "llama3", "factor": s, "low_freq_factor": low,
                                              "high_freq_factor": high, "original_max_position_embeddings": L})
  ref = default(128, 500000.0)
  wavelen = 2 * math.pi / ref
  short, long_ = wavelen < L / high, wavelen > L / low
  mid = ~short & ~long_
  assert short.sum() and long_.sum() and mid.sum()
  np.testing.assert_allclose(inv[short], ref[short], rtol=1e-6)
  np.testing.assert_allclose(inv[long_], ref[long_] / s, rtol=1e-6)
  smooth = (L / wavelen[mid] - low) / (high - low)
  assert np.all((smooth > 0) & (smooth < 1))
  np.testing.assert_allclose(inv[mid], (1 - smooth) * ref[mid] / s + smooth * ref[mid], rtol=1e-6)


def test_longrope_switches_exactly_above_original_length():
  half = 32
  scaling = {"rope_type": "longrope", "short_factor": [1.0] * half, "long_factor": [3.0] * half,
               "original_max_position_embeddings": 4096}
  for seq_len in (None, 0, 100, 4096):
    inv = rope_frequencies(64, scaling=scaling, seq_len=seq_len, max_position_embeddings=16384)[0]
    np.testing.assert_allclose(inv, default(64), rtol=1e-6)
  for seq_len in (4097, 16384, 10**6):
    inv = rope_frequencies(64, scaling=scaling, seq_len=seq_len, max_position_embeddings=16384)[0]
    np.testing.assert_allclose(inv, default(64) / 3, rtol=1e-6)


def test_longrope_attention_defaults():
  scaling = {"rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": [2.0] * 32,
               "original_max_position_embeddings": 4096}
  assert rope_frequencies(64, scaling=scaling, max_position_embeddings=4096)[1] == 1.0  # factor 1
  assert rope_frequencies(64, scaling={**scaling, "factor": 8}, max_position_embeddings=4096)[1] == \
    pytest.approx(math.sqrt(1 + math.log(8) / math.log(4096)))
  assert rope_frequencies(64, scaling={**scaling, "attention_factor": 1.3})[1] == 1.3


def test_normalisation():
  assert validate_rope_scaling(None) == {"rope_type": "default"}
  cfg = validate_rope_scaling({"type": "linear", "factor": 2, "partial_rotary_factor": None})
  assert cfg == {"rope_type": "linear", "factor": 2}
  # rope_theta inside the dict (HF 5.x rope_parameters) overrides base
  np.testing.assert_array_equal(rope_frequencies(64, 10000.0, {"rope_type": "default", "rope_theta": 5e5})[0],
                                  rope_frequencies(64, 5e5)[0])


# ---------------------------------------------------------------- invalid dicts
LR = {"rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": [1.0] * 32}
INVALID = [
  ({"rope_type": "xpos"}, "unknown rope_type 'xpos'; valid rope types: default, linear, ntk, dynamic, yarn"),
  ({"rope_type": ["linear"]}, "unknown rope_type ['linear']"),
  ({"rope_type": "linear"}, "missing required key(s) ['factor']"),
  ({"rope_type": "llama3", "factor": 8, "low_freq_factor": 1}, "missing required key(s) ['high_freq_factor']"),
  ({"rope_type": "linear", "factor": 2, "beta_fast": 3}, "unknown key(s) ['beta_fast'] for rope_type 'linear'"),
  ({"rope_type": "dynamic", "factor": 2, "original_max_position_embeddings": 8},
     "unknown key(s) ['original_max_position_embeddings']"),
  ({"rope_type": "linear", "factor": 0.5}, "'factor' must be a number >= 1, got 0.5"),
  ({"rope_type": "yarn", "factor": "4"}, "'factor' must be a number >= 1, got '4'"),
  ({"rope_type": "ntk", "factor": True}, "'factor' must be a number >= 1, got True"),
  ({"rope_type": "ntk", "factor": float("nan")}, "'factor' must be a number >= 1"),
  ({**LR, "short_factor": [1.0] * 31}, "longrope short_factor has length 31, expected length 32"),
  ({**LR, "long_factor": [1.0] * 64}, "longrope long_factor has length 64, expected length 32"),
  ({**LR, "long_factor": 2.0}, "'long_factor' must be a non-empty list of numbers > 0"),
  ({"rope_type": "yarn", "factor": 4, "beta_fast": 1, "beta_slow": 1}, "needs beta_fast > beta_slow"),
  ({"rope_type": "yarn", "factor": 4, "beta_slow": 40}, "needs beta_fast > beta_slow, got beta_fast=32"),
  ({"rope_type": "yarn", "factor": 4, "truncate": 0}, "'truncate' must be a bool"),
  ({"rope_type": "yarn", "factor": 4, "attention_factor": -1.0}, "'attention_factor' must be a number > 0"),
  ({"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 4096.0},
     "'original_max_position_embeddings' must be a positive int"),
  ({"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 1},
     "needs high_freq_factor > low_freq_factor"),
  ({"rope_type": "linear", "factor": 2, "partial_rotary_factor": 1.5}, "'partial_rotary_factor' must be"),
  ({"type": "linear", "rope_type": "yarn", "factor": 2}, "conflicting rope_type='yarn' and legacy type='linear'"),
  ([("rope_type", "linear")], "must be a dict or None"),
]


@pytest.mark.parametrize("scaling,message", INVALID)
def test_invalid_dicts(scaling, message):
  with pytest.raises(ValueError) as err:
    rope_frequencies(64, scaling=scaling, max_position_embeddings=4096)
  assert message in str(err.value)


@pytest.mark.parametrize("kwargs,message", [
  (dict(head_dim=64, scaling={"rope_type": "dynamic", "factor": 2}), "needs max_position_embeddings"),
  (dict(head_dim=64, scaling={"rope_type": "yarn", "factor": 2}), "needs original_max_position_embeddings"),
  (dict(head_dim=64, scaling=LR), "needs original_max_position_embeddings"),
  (dict(head_dim=64, scaling={**LR, "original_max_position_embeddings": 8}), "needs factor, attention_factor"),
  (dict(head_dim=10, scaling={"rope_type": "default", "partial_rotary_factor": 0.5}), "must be even"),
  (dict(head_dim=0), "head_dim must be a positive int"),
  (dict(head_dim=2, scaling={"rope_type": "ntk", "factor": 2}), "needs rotary_dim > 2"),
])
def test_missing_context(kwargs, message):
  with pytest.raises(ValueError, match=message):
    rope_frequencies(**kwargs)


def test_validate_public():
  assert validate_rope_scaling(LR, head_dim=64)["rope_type"] == "longrope"
  validate_rope_scaling({**LR, "short_factor": [1.0] * 3})  # length unknown without head_dim
  with pytest.raises(ValueError, match="expected length 32"):
    validate_rope_scaling({**LR, "short_factor": [1.0] * 3}, head_dim=64)
