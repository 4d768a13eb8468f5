"""evaluation/needle_attention.py: the answer query's weight on the key and on far keys."""
import jax
import numpy as np

from configs.common import resolve
from evaluation import needle, needle_attention
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
  # far = 0: every key but the query itself, so far + self weight = 1
  none_near = needle_attention.answer_query_attention(model, example, far=0)["far"]
  self_weight = np.stack([np.asarray(m[0, :, n - 1, n - 1]) for m in maps])
  np.testing.assert_allclose(none_near + self_weight, 1.0, atol=1e-5)
