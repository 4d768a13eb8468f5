"""Evaluation windows over documents: non-overlapping and sliding (strided).

Sliding mode follows Press et al. 2022 (ALiBi, appendix "sliding window
evaluation") and the PI / YaRN protocol (Chen et al. 2023 sec. 3.2; Hugging Face
"Perplexity of fixed-length models" recipe with stride S), with the known bugs of
common copies of that recipe avoided:

  * every target x_1 .. x_{n-1} of a document of n tokens is scored exactly once
    (loss_mask marks only the targets the previous window did not score);
  * window k (inputs x[kS : kS+L], targets x[kS+1 : kS+L+1]) scores its last S
    targets, so each has >= L - S + 1 tokens of context, except the first window of
    a document, which scores all its L targets (the document start has no more);
  * the window that would run past the document end is moved back to end exactly
    at it (start n-1-L): still full length, still scoring only new targets, which
    then have even more context; no padding inside a document;
  * the caller averages over scored tokens, never over windows.

Target t (1 <= t <= n-1) of a document therefore sits in the window starting at
  start(t) = 0 if t <= L else min(ceil((t - L) / S) * S, n - 1 - L),
the closed form the brute-force test checks against.
"""
import numpy as np

from input_pipeline import base

MODES = ("nonoverlapping", "sliding")


def check_mode(mode, length, stride):
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; valid choices: {', '.join(MODES)}")
  if mode == "sliding" and not 1 <= stride <= length:
    raise ValueError(f"sliding stride must be in [1, length={length}], got {stride}")


def resolve_stride(mode, length, stride):
  """Stride actually used: the window length for non-overlapping, L // 2 if 0 for sliding."""
  if mode == "nonoverlapping":
    return length
  return stride or max(1, length // 2)


def sliding_windows(docs, length, stride, max_tokens=None):
  """Yield (doc_id, start, window [L+1] int32, first_scored, n_targets) per window.

  Targets first_scored .. n_targets - 1 (in-window indices) are the newly scored ones.
  With max_tokens, whole windows are taken while the scored total stays <= max_tokens.
  """
  used = 0
  for d, doc in enumerate(docs):
    n = len(doc)
    done = 0  # targets t <= done are scored (targets are 1-indexed token positions)
    start = 0
    while done < n - 1:
      start = min(start, max(n - 1 - length, 0))
      end = min(start + length, n - 1)  # last target index of this window
      first = done - start  # in-window index of the first new target (target done + 1)
      new = end - done
      if max_tokens is not None and used + new > max_tokens:
        return
      used += new
      w = np.zeros(length + 1, np.int32)
      chunk = doc[start:end + 1]
      w[:len(chunk)] = chunk
      yield d, start, w, first, end - start
      done = end
      start += stride


def sliding_batches(docs, length, stride, batch_size, max_tokens=None):
  """Batches (standard keys + doc_id, offset) whose loss_mask marks the new targets."""
  return base.batch_windows(sliding_windows(docs, length, stride, max_tokens), length,
                            batch_size)


def eval_batches(task, mode, split, length, stride, batch_size, max_tokens=None, segment_len=0):
  """The batches of one (mode, length); sliding mode needs a text task (documents).

  segment_len > 0 (text only): score max_tokens // segment_len segments of segment_len
  tokens spread evenly over the split (``base.spread_segments``; doc_id = segment index),
  the same targets at every length <= segment_len; 0: the split's first max_tokens tokens.
  """
  check_mode(mode, length, stride)
  if segment_len and task.is_text:
    if length > segment_len:
      raise ValueError(f"length {length} exceeds the evaluation segments ({segment_len} tokens)")
    if not max_tokens:
      raise ValueError("segment sampling needs max_tokens (segments = max_tokens // segment_len)")
    docs = base.spread_segments(task.eval_docs(split), segment_len, max_tokens // segment_len)
    if mode == "nonoverlapping":
      return base.batched_eval(docs, length, batch_size)
    return sliding_batches(docs, length, stride, batch_size)
  if mode == "nonoverlapping":
    return task.eval_batches(split, length, batch_size, max_tokens)
  if not task.is_text:
    raise ValueError(f"sliding mode needs a text task (documents); {task.name!r} is synthetic, "
                     "whose sequences are generated at each length: use mode=nonoverlapping")
  return sliding_batches(task.eval_docs(split), length, stride, batch_size, max_tokens)
