"""Which position ids training sees (orthogonal to the encoding).

``config.positions.kind``:
  contiguous - 0..L-1 (default).
Every encoding reads positions from the batch, so a sampling scheme here works
with all of them.
"""
import ml_collections

KINDS = ("contiguous",)


def default_positions_config():
  return ml_collections.ConfigDict(dict(
      kind="contiguous",  # how training position ids are drawn: contiguous
  ))


def validate(cfg, train_len):
  if cfg.kind not in KINDS:
    raise ValueError(f"unknown positions.kind {cfg.kind!r}; valid choices: {', '.join(KINDS)}")
  del train_len


def apply_positions(cfg, batch, seed, step):
  """Returns the training batch with ``positions`` drawn per cfg (pure in (seed, step))."""
  del cfg, seed, step
  return batch
