"""Host-side accumulation of per-token results into one results row.

Every token is weighted equally: sums over scored tokens are divided once, at the
end, by the number of scored tokens (never a mean of per-window means, which
over-weights short windows at document ends).
"""
import math

import numpy as np


def log2_buckets(n):
  """Bucket edges [lo, hi) over 0..n-1 on a log2 scale: [0,1), [1,3), [3,7), ... (bucket
  b holds positions with floor(log2(pos + 1)) == b)."""
  edges = [0]
  while edges[-1] < n:
    edges.append(min(2 * edges[-1] + 1, n))
  return list(zip(edges[:-1], edges[1:]))


def _bucketed(sums, counts, buckets):
  out = []
  for lo, hi in buckets:
    c = counts[lo:hi].sum()
    out.append(float(sums[lo:hi].sum() / c) if c else None)
  return out


class Accumulator:
  """Sums over batches of {nll [B,L], correct [B,L] (synthetic)} and the batch dicts."""

  def __init__(self, length):
    self.length = length
    self.nll_sum, self.tokens, self.windows = 0.0, 0.0, 0
    self.bytes = 0.0  # UTF-8 bytes of the scored targets (bits per byte)
    self.pos_sum, self.pos_count = np.zeros(length), np.zeros(length)
    self.opt_sum = 0.0
    self.ans_correct, self.ans_tokens = 0.0, 0.0
    self.passkey = {}  # distance bucket (lo, hi) -> [correct examples, examples]

  def add(self, batch, out):
    mask = np.asarray(batch["loss_mask"], np.float64)
    nll = np.asarray(out["nll"], np.float64) * mask
    self.nll_sum += nll.sum()
    self.tokens += mask.sum()
    # tokenized text: batches carry each target's byte count; byte-level: one byte each
    self.bytes += (mask * batch["target_bytes"]).sum() if "target_bytes" in batch else mask.sum()
    self.windows += int((mask.sum(1) > 0).sum())
    self.pos_sum += nll.sum(0)
    self.pos_count += mask.sum(0)
    if "optimal_nll" in batch:
      self.opt_sum += (np.asarray(batch["optimal_nll"], np.float64) * mask).sum()
    if "answer_mask" in batch and "correct" in out:
      self._add_answers(batch, np.asarray(out["correct"], np.float64))

  def _add_answers(self, batch, correct):
    answer = np.asarray(batch["answer_mask"], np.float64)
    self.ans_correct += (correct * answer).sum()
    self.ans_tokens += answer.sum()
    if "passkey_distance" not in batch:
      return
    # An example is retrieved when every answer token is right (argmax = target).
    ok = ((correct * answer).sum(1) == answer.sum(1)) & (answer.sum(1) > 0)
    for dist, good in zip(np.asarray(batch["passkey_distance"]), ok):
      if dist < 0:  # padding row
        continue
      b = int(math.floor(math.log2(dist))) if dist >= 1 else 0
      cell = self.passkey.setdefault((2 ** b, 2 ** (b + 1)), [0, 0])
      cell[0] += int(good)
      cell[1] += 1

  def row(self, is_text):
    """Result fields: tokens, nll, ppl, bpb (text) or excess loss / accuracy (synthetic)."""
    nll = self.nll_sum / self.tokens if self.tokens else float("nan")
    buckets = log2_buckets(self.length)
    out = {"tokens": int(self.tokens), "windows": self.windows, "nll": nll,
           "ppl": float(np.exp(min(nll, 700.0))),
           "position_buckets": [list(b) for b in buckets],
           "position_nll": _bucketed(self.pos_sum, self.pos_count, buckets)}
    if is_text:  # bits per byte = total nats / (ln 2 * bytes): comparable across tokenizers
      out["bytes"] = int(self.bytes)
      out["bpb"] = self.nll_sum / (math.log(2) * self.bytes) if self.bytes else float("nan")
      return out
    out["optimal_nll"] = self.opt_sum / self.tokens if self.tokens else float("nan")
    out["excess_nll"] = nll - out["optimal_nll"]
    if self.ans_tokens:
      out["answer_acc"] = self.ans_correct / self.ans_tokens
    if self.passkey:
      keys = sorted(self.passkey)
      out["passkey_distance_buckets"] = [list(k) for k in keys]
      out["passkey_acc"] = [self.passkey[k][0] / self.passkey[k][1] for k in keys]
      out["passkey_count"] = [self.passkey[k][1] for k in keys]
    return out
