"""Recall tasks: copy (induction) and passkey (associative recall). See synthetic.py for
seeding; both return optimal_nll, answer_mask and (passkey) passkey_distance."""
import math

import numpy as np

from input_pipeline import synthetic


class CopyTask(synthetic.SyntheticTask):
  """x = p SEP p SEP p ... cut to L+1 tokens; p = n symbols ~ Uniform(V), SEP = V.

  n = prefix_len, or L // 2 when prefix_len = 0 (then the window is exactly p SEP p).
  With n fixed, everything from the first SEP on is determined by the past, so the optimal
  loss is log V on the prefix symbols x_1..x_{n-1} and 0 on x_n.. (SEP and the copies).
  answer_mask = copied symbols (not SEPs). loss_on: 'all' tokens or only 'copy' (= answer_mask).
  """

  name = "copy"

  def __init__(self, seed, vocab_size=16, prefix_len=0, loss_on="all", **kw):
    super().__init__(seed, **kw)
    if loss_on not in ("all", "copy"):
      raise ValueError(f"copy.loss_on must be 'all' or 'copy', got {loss_on!r}")
    if not 2 <= vocab_size <= 255:
      raise ValueError(f"copy.vocab_size must be in [2, 255], got {vocab_size}")
    self.symbols, self.prefix_len, self.loss_on = int(vocab_size), int(prefix_len), loss_on
    self.sep = self.symbols
    self.vocab_size = self.symbols + 1

  def _generate(self, rngs, length):
    n = self.prefix_len or length // 2
    if not 1 <= n <= length - 1:
      raise ValueError(f"copy prefix length {n} must be in [1, L-1] for L={length}")
    prefix = np.stack([r.integers(0, self.symbols, n) for r in rngs]).astype(np.int32)
    unit = np.concatenate([prefix, np.full((len(rngs), 1), self.sep, np.int32)], 1)
    seq = np.tile(unit, (1, length // (n + 1) + 2))[:, :length + 1]
    idx = np.arange(length + 1)[None]
    nll = np.where(idx < n, math.log(self.symbols), 0.0).astype(np.float32)
    nll = np.broadcast_to(nll, seq.shape).copy()
    answer = (idx > n) & (seq != self.sep)
    out = {"seq": seq, "nll": nll, "answer": answer}
    if self.loss_on == "copy":
      out["scored"] = answer
    return out


def _cumcount(codes):
  """rank[i] = #{i' < i : codes[i'] == codes[i]} (vectorised group-wise running count)."""
  order = np.argsort(codes, kind="stable")
  s = codes[order]
  first = np.r_[True, s[1:] != s[:-1]]
  start = np.maximum.accumulate(np.where(first, np.arange(len(s)), 0))
  rank = np.empty(len(s), np.int64)
  rank[order] = np.arange(len(s)) - start
  return rank


class PasskeyTask(synthetic.SyntheticTask):
  """[PAD]*r, m pairs (key, value), QUERY, key*, value*  (L+1 tokens in all).

  Keys: key_len symbols of K (ids 0..K-1), m distinct keys drawn without replacement from
  the K^key_len possible; values: val_len symbols of Vv (ids K..K+Vv-1); QUERY = K+Vv,
  PAD = K+Vv+1 (r = leftover so the query ends the window). key* = key of a pair chosen
  uniformly, so its distance to the query is uniform over the window.
  Optimal loss (exact, given the past): PAD, QUERY and the answer value*: 0; value tokens
  log Vv; key token j of the i-th key: -log((K^(J-j-1) - c_{j+1}) / (K^(J-j) - c_j)) with
  c_j = #earlier keys sharing its first j tokens (c_0 = i), J = key_len; query-key token j:
  -log(n_{j+1} / n_j), n_j = #context keys sharing the query's first j tokens (n_0 = m).
  passkey_distance [B] = position of value* minus position of the stored value.
  """

  name = "passkey"

  def __init__(self, seed, key_vocab=64, value_vocab=64, key_len=2, value_len=1,
               loss_on="all", **kw):
    super().__init__(seed, **kw)
    self.k, self.vv, self.key_len, self.val_len = key_vocab, value_vocab, key_len, value_len
    self.query, self.pad = key_vocab + value_vocab, key_vocab + value_vocab + 1
    self.vocab_size = key_vocab + value_vocab + 2
    if self.vocab_size > 256 or min(key_vocab, value_vocab, key_len, value_len) < 1:
      raise ValueError("passkey needs key_vocab + value_vocab + 2 <= 256 and positive sizes")
    if loss_on not in ("all", "answer"):
      raise ValueError(f"passkey.loss_on must be 'all' or 'answer', got {loss_on!r}")
    self.loss_on = loss_on

  def _layout(self, length):
    pair = self.key_len + self.val_len
    body = length + 1 - (1 + pair)
    m, r = body // pair, body % pair
    if m < 1 or m > self.k ** self.key_len:
      raise ValueError(f"passkey: L={length} gives {m} pairs; need 1 <= m <= key_vocab^key_len"
                       f" = {self.k ** self.key_len} (raise passkey.key_len)")
    return m, r, pair

  def _example(self, rng, length):
    m, r, pair = self._layout(length)
    J, K = self.key_len, self.k
    keys = rng.choice(K ** J, size=m, replace=False)
    vals = rng.integers(0, self.vv, size=(m, self.val_len))
    q = int(rng.integers(m))
    digits = (keys[:, None] // K ** np.arange(J - 1, -1, -1)[None]) % K   # [m, J]
    prefix = [keys // K ** (J - j) for j in range(J + 1)]                  # codes of j-prefixes
    c = [_cumcount(p) for p in prefix]
    key_nll = np.stack([-np.log((K ** (J - j - 1) - c[j + 1]) / (K ** (J - j) - c[j]))
                        for j in range(J)], 1)
    n = [np.sum(p == p[q]) for p in prefix]
    q_nll = [-math.log(n[j + 1] / n[j]) for j in range(J)]
    pairs = np.concatenate([digits, vals + K], 1).reshape(-1)
    pair_nll = np.concatenate([key_nll, np.full((m, self.val_len), math.log(self.vv))], 1)
    seq = np.concatenate([[self.pad] * r, pairs, [self.query], digits[q], vals[q] + K])
    nll = np.concatenate([np.zeros(r), pair_nll.reshape(-1), [0.0], q_nll,
                          np.zeros(self.val_len)])
    answer = np.arange(length + 1) >= length + 1 - self.val_len
    distance = (length + 1 - self.val_len) - (r + q * pair + J)
    return seq, nll, answer, distance

  def _generate(self, rngs, length):
    seq, nll, answer, dist = zip(*(self._example(r, length) for r in rngs))
    out = {"seq": np.stack(seq).astype(np.int32), "nll": np.stack(nll).astype(np.float32),
           "answer": np.stack(answer), "passkey_distance": np.array(dist, np.int32)}
    if self.loss_on == "answer":
      out["scored"] = out["answer"]
    return out
