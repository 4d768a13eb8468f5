"""Which position ids training (and, optionally, evaluation) sees; orthogonal to the
encoding, since every encoding reads positions from the batch.

``config.positions.kind``:
  contiguous - 0..L-1 in every row (default).
  randomized - Ruoss et al. 2023, "Randomized Positional Encodings Boost Length
      Generalization of Transformers" (arXiv 2305.16843, sec. 3): each row gets a
      sorted random subset of train_len distinct positions out of [0, max_len), so
      training already visits the positions (and distances) of sequences up to
      max_len. As in the reference code (github google-deepmind/
      randomized_positional_encodings, ``models/positional_encodings.py``,
      ``noisy_fixed_positional_encodings``: ``jrandom.choice(..., replace=False)`` then
      ``jnp.sort``). The reference draws one subset per batch; here each row draws its
      own (``per_row``). Draws are pure functions of (seed, step): resuming a run
      reproduces them.
  pose - Zhu et al. 2024, "PoSE: Efficient Context Window Extension of LLMs via
      Positional Skip-wise Training" (arXiv 2309.10400, sec. 3.2): the train_len window is
      cut into ``pose_chunks`` chunks whose position ids get monotone random skips, so a
      short window covers the relative distances of a target length ``max_len``: chunk 0
      starts at 0, chunk c is shifted by u_c with 0 <= u_1 <= ... <= u_{N-1} <= max_len -
      train_len, so ids stay increasing and below max_len. As the reference
      (dwzhu-pku/PoSE ``src/train_pose.py``, ``train_preprocess_function_pose``: two
      chunks, the first of length U[1, (L+1)//2], the skip U[0, L_t - L]) for 2 chunks;
      for more, cut points and skips are sorted uniform draws. The reference also takes
      the second chunk's *text* from further along the document; here the text stays
      contiguous and only the ids skip. Fine-tune at the short length toward a target:
      ``--config.positions.kind=pose --config.positions.max_len=2048``.

``config.positions.eval`` (what ``eval_positions`` gives an evaluation at length L):
  contiguous - 0..L-1 (default): the usual evaluation, comparable across runs.
  randomized - a sorted random subset of [0, max_len) like training; this is what the
      reference code does (its range evaluation passes a fresh rng to the model, which
      samples noisy positions on every call). Needs L <= max_len.
The in-training validation of ``train.py`` uses the task's contiguous positions.
"""
import ml_collections
import numpy as np

KINDS = ("contiguous", "randomized", "pose")
EVAL_KINDS = ("contiguous", "randomized", "pose")
_TRAIN_TAG, _EVAL_TAG = 0x706F73, 0x65766C  # separate random streams from the data's


def default_positions_config():
  return ml_collections.ConfigDict(dict(
      kind="contiguous",  # how training position ids are drawn: contiguous | randomized | pose
      max_len=2048,  # randomized / pose: position ids stay in [0, max_len); must be >= train_len
      pose_chunks=2,  # pose: chunks per window (the paper's N; 2 as in its experiments)
      per_row=True,  # randomized: a fresh subset per row (False = one per batch, as reference)
      eval="contiguous",  # positions at evaluation: contiguous (0..L-1) | randomized
  ))


def validate(cfg, train_len):
  """Raises ValueError naming the bad field and the valid choices."""
  if cfg.kind not in KINDS:
    raise ValueError(f"unknown positions.kind {cfg.kind!r}; valid choices: {', '.join(KINDS)}")
  if cfg.eval not in EVAL_KINDS:
    raise ValueError(f"unknown positions.eval {cfg.eval!r}; valid choices: "
                     f"{', '.join(EVAL_KINDS)}")
  if cfg.kind != "contiguous" or cfg.eval == "randomized":
    if cfg.max_len < train_len:
      raise ValueError(f"positions.max_len={cfg.max_len} is smaller than train_len={train_len}; "
                       f"{cfg.kind} positions put train_len distinct ids in [0, max_len), "
                       f"so set positions.max_len >= {train_len}")
  if cfg.kind == "pose" and not 1 <= cfg.get("pose_chunks", 2) <= train_len:
    raise ValueError(f"positions.pose_chunks={cfg.pose_chunks} must be in [1, train_len]")


def largest_position(cfg, train_len):
  """The largest position id training can produce under cfg."""
  return train_len - 1 if cfg.kind == "contiguous" else cfg.max_len - 1


def check_encoding(cfg, train_len, encoding):
  """Raises a readable ValueError if ``encoding`` (a built PositionalEncoding) cannot
  represent the positions cfg draws in training (e.g. a learned table shorter than
  max_len). Under jit such lookups would only show up as a NaN loss."""
  limit, needed = encoding.max_position, largest_position(cfg, train_len)
  if limit is not None and needed > limit:
    raise ValueError(
        f"positions.kind={cfg.kind!r} with positions.max_len={cfg.max_len} draws position "
        f"ids up to {needed}, but encoding {encoding.name!r} supports only 0..{limit}; lower "
        f"positions.max_len to <= {limit + 1} or enlarge the encoding's table "
        f"(config.posenc.{encoding.name}.max_len)")


def random_positions(rng, rows, length, max_len, per_row=True):
  """Sorted subsets of ``length`` distinct ids from [0, max_len): int32 [rows, length]."""
  if length > max_len:
    raise ValueError(f"cannot draw {length} distinct positions from [0, {max_len}); "
                     f"raise positions.max_len to >= {length}")
  draws = rows if per_row else 1
  out = np.stack([np.sort(rng.choice(max_len, size=length, replace=False))
                  for _ in range(draws)]).astype(np.int32)
  return np.broadcast_to(out, (rows, length)).copy()


def pose_positions(rng, rows, length, max_len, chunks=2):
  """PoSE position ids int32 [rows, length]: ``chunks`` chunks of 0..length-1, chunk c
  shifted by a skip u_c (u_0 = 0, non-decreasing, u_c <= max_len - length)."""
  if length > max_len:
    raise ValueError(f"PoSE window {length} exceeds the target length {max_len}; "
                     f"raise positions.max_len to >= {length}")
  out = np.empty((rows, length), np.int32)
  for r in range(rows):
    if chunks == 2:  # the reference: first chunk U[1, (L+1)//2] long
      cuts = [int(rng.integers(1, (length + 1) // 2 + 1))]
    else:
      cuts = sorted(rng.choice(np.arange(1, length), chunks - 1, replace=False).tolist())
    skips = np.sort(rng.integers(0, max_len - length + 1, len(cuts)))
    chunk = np.searchsorted(cuts, np.arange(length), side="right")  # chunk index per token
    out[r] = np.arange(length) + np.concatenate([[0], skips])[chunk]  # eq.: i + u_c
  return out


def train_positions(cfg, batch_size, length, seed, step):
  """Training position ids [batch_size, length] for ``step`` (pure in (seed, step))."""
  if cfg.kind == "contiguous":
    return np.broadcast_to(np.arange(length, dtype=np.int32), (batch_size, length)).copy()
  rng = np.random.default_rng([int(seed), int(step), _TRAIN_TAG])
  if cfg.kind == "pose":
    return pose_positions(rng, batch_size, length, cfg.max_len, cfg.get("pose_chunks", 2))
  return random_positions(rng, batch_size, length, cfg.max_len, cfg.per_row)


def apply_positions(cfg, batch, seed, step):
  """Returns the training batch with ``positions`` drawn per cfg (pure in (seed, step))."""
  if cfg.kind == "contiguous":
    return batch
  b, length = batch["inputs"].shape
  return {**batch, "positions": train_positions(cfg, b, length, seed, step)}


def eval_positions(cfg, length, batch_size, seed=0, index=0):
  """Position ids [batch_size, length] for evaluation batch ``index`` per ``cfg.eval``.

  contiguous: 0..length-1 in every row, any length. randomized: sorted subsets of
  [0, max_len) (needs length <= max_len), reproducible from (seed, index).
  """
  if cfg.eval not in EVAL_KINDS:
    raise ValueError(f"unknown positions.eval {cfg.eval!r}; valid choices: "
                     f"{', '.join(EVAL_KINDS)}")
  if cfg.eval == "contiguous":
    return np.broadcast_to(np.arange(length, dtype=np.int32), (batch_size, length)).copy()
  rng = np.random.default_rng([int(seed), int(index), _EVAL_TAG])
  return random_positions(rng, batch_size, length, cfg.max_len, cfg.per_row)


def check_config(config):
  """``check_encoding`` for a full lenx config (called by ``configs.common.resolve``).

  Builds the encoding abstractly (``nnx.eval_shape``: no parameter memory) to read
  its ``max_position``; only needed for randomized positions.
  """
  if config.positions.kind == "contiguous":
    return
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import posenc  # pylint: disable=g-import-not-at-top
  enc = nnx.eval_shape(lambda: posenc.build(config.posenc, config.model, rngs=nnx.Rngs(0)))
  check_encoding(config.positions, config.train_len, enc)
