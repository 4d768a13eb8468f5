"""Host-side accumulation of per-token results into one results row.

Every token is weighted equally: sums over scored tokens are divided once, at the
end, by the number of scored tokens (never a mean of per-window means, which
over-weights short windows at document ends).

The standard error of that mean treats *clusters* of tokens as the independent units
(tokens of one window, or of one evaluation segment, are correlated: same passage, same
topic), via the ratio estimator's cluster-robust variance (Cochran 1977, sec. 6.4):

  SE(nll) = sqrt(K / (K - 1) * sum_c (S_c - nll * N_c)^2) / sum_c N_c

with S_c the summed NLL and N_c the scored tokens of cluster c, K clusters.
"""
import collections
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


CLUSTER_UNITS = ("window", "segment")  # segment: the batch's doc_id (spread_segments)
Z95 = 1.959964  # two-sided 95 % normal quantile


def cluster_se(sums, counts):
  """Standard error of sum(sums) / sum(counts) with clusters as units (module docstring)."""
  sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
  k = len(sums)
  if k < 2 or counts.sum() == 0:
    return float("nan")
  mean = sums.sum() / counts.sum()
  return float(np.sqrt(k / (k - 1) * np.sum((sums - mean * counts) ** 2)) / counts.sum())


def paired_difference(row, ref):
  """(mean NLL of ``row`` minus that of ``ref``, its standard error) over the segments both
  scored: the per-segment differences of summed NLL are the cluster units, so text
  difficulty shared by the two rows cancels (a variant vs "none" on the same targets).
  Rows must carry segment sums on the same segments with the same token counts."""
  if row.get("segment_ids") is None or row.get("segment_ids") != ref.get("segment_ids") or (
      row["segment_tokens"] != ref["segment_tokens"]):
    raise ValueError("paired_difference needs two rows scored on the same segments and "
                     "targets (same segment_ids and segment_tokens; evaluate with sample=spread)")
  diffs = np.subtract(row["segment_nll_sums"], ref["segment_nll_sums"])
  tokens = np.asarray(row["segment_tokens"], np.float64)
  return float(diffs.sum() / tokens.sum()), cluster_se(diffs, tokens)


class Accumulator:
  """Sums over batches of {nll [B,L], correct [B,L] (synthetic)} and the batch dicts."""

  def __init__(self, length, cluster="window"):
    if cluster not in CLUSTER_UNITS:
      raise ValueError(f"unknown cluster unit {cluster!r}; valid choices: {', '.join(CLUSTER_UNITS)}")
    self.length, self.cluster = length, cluster
    self.clusters = collections.defaultdict(lambda: [0.0, 0.0])  # id -> [nll sum, tokens]
    self.rows_seen = 0
    self.nll_sum, self.tokens, self.windows = 0.0, 0.0, 0
    self.bytes = 0.0  # UTF-8 bytes of the scored targets (bits per byte)
    self.pos_sum, self.pos_count = np.zeros(length), np.zeros(length)
    self.ent_sum, self.pos_ent_sum = 0.0, np.zeros(length)
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
    self._add_clusters(batch, nll.sum(1), mask.sum(1))
    self.pos_sum += nll.sum(0)
    if "entropy" in out:  # output entropy, summed like the NLL
      ent = np.asarray(out["entropy"], np.float64) * mask
      self.ent_sum += ent.sum()
      self.pos_ent_sum += ent.sum(0)
    self.pos_count += mask.sum(0)
    if "optimal_nll" in batch:
      self.opt_sum += (np.asarray(batch["optimal_nll"], np.float64) * mask).sum()
    if "answer_mask" in batch and "correct" in out:
      self._add_answers(batch, np.asarray(out["correct"], np.float64))

  def _add_clusters(self, batch, row_nll, row_tokens):
    ids = (np.asarray(batch["doc_id"]) if self.cluster == "segment"
           else self.rows_seen + np.arange(len(row_nll)))
    self.rows_seen += len(row_nll)
    for c, s, n in zip(ids, row_nll, row_tokens):
      if n > 0:
        cell = self.clusters[int(c)]
        cell[0] += s
        cell[1] += n

  def uncertainty(self, nll):
    """nll_se, its unit and cluster count, and the 95 % perplexity interval it implies."""
    sums, counts = zip(*self.clusters.values()) if self.clusters else ((), ())
    se = cluster_se(sums, counts)
    out = {"nll_se": se, "se_unit": self.cluster, "se_clusters": len(self.clusters),
           "ppl_ci95": [float(np.exp(min(nll - Z95 * se, 700.0))),
                        float(np.exp(min(nll + Z95 * se, 700.0)))]}
    if self.cluster == "segment":  # the same segments at every length and variant: paired
      ids = sorted(self.clusters)  # comparisons between rows (``paired_difference``)
      out["segment_ids"] = ids
      out["segment_nll_sums"] = [float(self.clusters[i][0]) for i in ids]
      out["segment_tokens"] = [int(self.clusters[i][1]) for i in ids]
    return out

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
           "position_nll": _bucketed(self.pos_sum, self.pos_count, buckets),
           **self.uncertainty(nll)}
    if self.pos_ent_sum.any():  # mean entropy (nats) of the predicted distribution
      out["entropy"] = self.ent_sum / self.tokens
      out["position_entropy"] = _bucketed(self.pos_ent_sum, self.pos_count, buckets)
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
