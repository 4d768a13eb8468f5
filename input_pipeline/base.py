"""Task interface and the window/batch helpers shared by text and synthetic tasks.

Conventions (all numpy, shapes static):
  inputs  int32 [B, L]   tokens x_0 .. x_{L-1} of a window of L+1 tokens
  targets int32 [B, L]   next tokens x_1 .. x_L  (targets[:, t] == window[t + 1])
  loss_mask float32 [B, L]  1 where the target is scored, 0 on padding
  positions int32 [B, L]    np.arange(L) per row
Batches are pure functions of (seed, step[, index]); no global RNG state is used.
"""
import itertools

import numpy as np

SPLITS = ("train", "validation", "test")


class Task:
  """Base class. Subclasses set `name`, `vocab_size`, `is_text` and implement the methods."""

  name: str = ""
  vocab_size: int = 256
  is_text: bool = False  # byte-level text: report bits per byte = nll / ln 2

  def __init__(self, seed: int):
    self.seed = int(seed)

  def train_batch(self, step: int, batch_size: int, length: int) -> dict:
    raise NotImplementedError

  def eval_batches(self, split: str, length: int, batch_size: int, max_tokens=None):
    raise NotImplementedError

  def eval_docs(self, split: str):
    raise NotImplementedError


def encode(text) -> np.ndarray:
  """Byte tokenizer (vocab 256): str or UTF-8 bytes -> uint8 array of byte values."""
  data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
  return np.frombuffer(data, dtype=np.uint8)


def decode(tokens) -> str:
  return np.asarray(tokens, dtype=np.uint8).tobytes().decode("utf-8", errors="replace")


def check_split(split):
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


def windows_to_batch(windows, length, extra=None):
  """Stack windows (int arrays of L+1 tokens) into the standard batch dict."""
  w = np.asarray(windows, dtype=np.int32).reshape(-1, length + 1)
  batch = {
      "inputs": w[:, :-1].copy(),
      "targets": w[:, 1:].copy(),
      "loss_mask": np.ones((w.shape[0], length), np.float32),
      "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (w.shape[0], length)).copy(),
  }
  batch.update(extra or {})
  return batch


def pad_batch(batch, batch_size):
  """Pad every [b, ...] array to batch_size rows; pad rows get loss_mask 0 (ids -1)."""
  b = batch["inputs"].shape[0]
  if b == batch_size:
    return batch
  out = {}
  for k, v in batch.items():
    fill = -1 if k in ("doc_id", "passkey_distance") else 0
    pad = np.full((batch_size - b,) + v.shape[1:], fill, v.dtype)
    if k == "positions":
      pad = np.broadcast_to(np.arange(v.shape[1], dtype=v.dtype), pad.shape).copy()
    out[k] = np.concatenate([v, pad], axis=0)
  return out


def sample_train_windows(flat, doc_starts, doc_lens, rng, batch_size, length):
  """Random windows of L+1 tokens, uniform over all valid (doc, start) pairs.

  A doc of n tokens has max(n - L, 0) valid starts, so a doc is picked with probability
  proportional to its number of starts (~ its length) and windows never cross documents.
  `flat` is all docs concatenated; doc_starts[i] is doc i's offset in it.
  """
  n_starts = np.maximum(doc_lens - length, 0)
  total = int(n_starts.sum())
  if total == 0:
    raise ValueError(f"no document has more than length={length} tokens")
  g = rng.integers(0, total, size=batch_size)           # global start index
  cum = np.cumsum(n_starts)
  doc = np.searchsorted(cum, g, side="right")             # doc containing start g
  local = g - (cum[doc] - n_starts[doc])
  idx = (doc_starts[doc] + local)[:, None] + np.arange(length + 1)
  return flat[idx]


def eval_windows(docs, length, max_tokens=None):
  """Yield (doc_id, offset, window, n_scored) cutting each doc separately.

  Window j of a doc of n tokens covers tokens [jL, jL + L] (L+1 tokens, consecutive windows
  share one token), so every token x_1 .. x_{n-1} is a target exactly once; the last window is
  shorter (zero-padded, scored count n_scored < L). With max_tokens, whole windows are taken
  in order while the running scored-token total stays <= max_tokens.
  """
  used = 0
  for d, doc in enumerate(docs):
    for off in range(0, max(len(doc) - 1, 0), length):
      chunk = doc[off:off + length + 1]
      n = len(chunk) - 1
      if max_tokens is not None and used + n > max_tokens:
        return
      used += n
      w = np.zeros(length + 1, np.int32)
      w[:len(chunk)] = chunk
      yield d, off, w, n


def batched_eval(docs, length, batch_size, max_tokens=None):
  """Batches of eval windows (see eval_windows) with doc_id [B] and offset [B] int32."""
  rows = ((d, off, w, 0, n) for d, off, w, n in eval_windows(docs, length, max_tokens))
  return batch_windows(rows, length, batch_size)


def batch_windows(rows, length, batch_size):
  """Batches from rows (doc_id, offset, window of L+1 tokens, first, last); the loss_mask
  scores targets first <= t < last of each window. Padded to batch_size rows."""
  rows = iter(rows)
  while chunk := list(itertools.islice(rows, batch_size)):
    extra = {"doc_id": np.array([r[0] for r in chunk], np.int32),
             "offset": np.array([r[1] for r in chunk], np.int32)}
    batch = windows_to_batch([r[2] for r in chunk], length, extra)
    idx = np.arange(length)[None]
    first = np.array([r[3] for r in chunk])[:, None]
    last = np.array([r[4] for r in chunk])[:, None]
    batch["loss_mask"] = ((idx >= first) & (idx < last)).astype(np.float32)
    yield pad_batch(batch, batch_size)


def spread_segments(docs, segment_len, num_segments):
  """``num_segments`` pieces of ``segment_len + 1`` tokens spread evenly over ``docs``.

  Segment i is centred at (i + 1/2) / num_segments of the documents' concatenation (moved
  to lie inside its document), so a small evaluation samples the whole split instead of
  its first pages. Cut into windows of any length <= segment_len, the same segments give
  every length exactly the same scored targets (a paired design: differences between
  lengths come from context alone), and each segment is one independent cluster for the
  standard error (``evaluation.metrics``). Deterministic.
  """
  fits = [d for d in docs if len(d) > segment_len]
  if num_segments < 1 or not fits:
    raise ValueError(f"cannot cut {num_segments} segment(s) of {segment_len} tokens: need "
                     f">= 1 segment and a document longer than {segment_len} tokens")
  lens = np.array([len(d) for d in fits], np.int64)
  room = lens - segment_len  # valid starts per document
  cum = np.cumsum(room)
  if cum[-1] < num_segments * (segment_len + 1):  # spacing >= a segment: none overlap
    raise ValueError(f"{num_segments} non-overlapping segments of {segment_len} tokens do not "
                     f"fit in the split ({int(lens.sum())} tokens); lower max_tokens")
  out = []
  for i in range(num_segments):
    g = int((i + 0.5) * cum[-1] / num_segments)  # evenly spaced over all valid starts
    d = int(np.searchsorted(cum, g, side="right"))
    start = g - int(cum[d] - room[d])
    out.append(np.asarray(fits[d][start:start + segment_len + 1]))
  return out
