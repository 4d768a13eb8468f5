"""Shared test fixtures: tiny configs that compile and run in seconds on a CPU."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.default import get_config  # noqa: E402


def make_tiny_config(posenc="rope", data="markov", train_len=32, **overrides):
  """A 1-layer, 32-wide model; overrides are dotted keys ("model.dropout": 0.1)."""
  c = get_config(f"posenc={posenc},data={data},train_len={train_len}")
  c.model.num_layers, c.model.d_model, c.model.num_heads = 1, 32, 2
  c.batch_size, c.num_train_steps = 4, 4
  c.log_every, c.eval_every, c.checkpoint_every = 2, 4, 2
  c.eval_tokens = 4 * train_len
  c.optim.warmup_steps = 1
  c.data.num_eval_sequences = 4
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture
def tiny_config():
  return make_tiny_config
