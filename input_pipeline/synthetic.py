"""Synthetic tasks with a known Bayes-optimal loss, generated at any length.

Every sequence x_0 .. x_L (L+1 tokens) is a pure function of a per-row generator:
train row i of step s uses np.random.default_rng([seed, 0, s, i]); eval row i of a split uses
default_rng([seed, 1 + split index, i]) (the same rows for any batch size). Each task also
returns optimal_nll[t] = -log p*(x_{t+1} | x_0..x_t) under the true generating process, so
excess loss = model nll - optimal_nll.
"""
import math

import numpy as np

from input_pipeline import base

TRAIN_STREAM, TABLE_STREAM = 0, 4  # eval splits use streams 1..3


class SyntheticTask(base.Task):
  """Subclasses implement _generate(rngs, length) -> dict of [B, L+1] seq-aligned arrays:
  'seq' (tokens), 'nll' (-log p* of each token given its past; entry 0 unused), optionally
  'answer' / 'scored' (bool), plus any [B] per-example arrays (copied into the batch as is)."""

  def __init__(self, seed, num_eval_sequences=64):
    super().__init__(seed)
    self.num_eval_sequences = int(num_eval_sequences)

  def _batch(self, rngs, length):
    g = self._generate(rngs, length)
    seq, nll = g.pop("seq"), g.pop("nll")
    extra = {"optimal_nll": nll[:, 1:].astype(np.float32)}
    if "answer" in g:
      extra["answer_mask"] = g.pop("answer")[:, 1:].astype(np.float32)
    scored = g.pop("scored", None)
    extra.update(g)  # per-example [B] arrays, e.g. passkey_distance
    batch = base.windows_to_batch(seq, length, extra)
    if scored is not None:
      batch["loss_mask"] = scored[:, 1:].astype(np.float32)
    return batch

  def train_batch(self, step, batch_size, length):
    rngs = [np.random.default_rng([self.seed, TRAIN_STREAM, int(step), i])
            for i in range(batch_size)]
    return self._batch(rngs, length)

  def _eval_rngs(self, split, n):
    base.check_split(split)
    stream = 1 + base.SPLITS.index(split)
    return [np.random.default_rng([self.seed, stream, i]) for i in range(n)]

  def eval_batches(self, split, length, batch_size, max_tokens=None):
    """num_eval_sequences fixed rows (at most max(1, max_tokens // length) of them),
    in batches of batch_size; the last batch is padded with loss_mask-0 rows."""
    n = self.num_eval_sequences
    if max_tokens is not None:
      n = min(n, max(1, int(max_tokens) // length))
    rngs = self._eval_rngs(split, n)
    for i in range(0, n, batch_size):
      yield base.pad_batch(self._batch(rngs[i:i + batch_size], length), batch_size)

  def eval_docs(self, split, length=1024):
    """The eval sequences of `split` (L+1 tokens each) as a list of int32 arrays."""
    g = self._generate(self._eval_rngs(split, self.num_eval_sequences), length)
    return list(g["seq"].astype(np.int32))


class MarkovTask(SyntheticTask):
  """k-th order Markov source over V symbols.

  Table T[s, x] = p(x | s), s = the previous k tokens (base-V code), rows ~ Dirichlet(alpha)
  drawn from default_rng([table_seed, 4]) (floored at 1e-9 so every log p is finite).
  x_0..x_{k-1} ~ Uniform(V). Optimal loss: nll_t = log V for the first k tokens, then
  -log T[x_{t-k..t-1}, x_t]; its mean tends to the entropy rate
  H = -sum_s pi(s) sum_x T[s,x] log T[s,x], pi = stationary distribution over states.
  """

  name = "markov"

  def __init__(self, seed, order=2, vocab_size=16, alpha=0.5, table_seed=-1, **kw):
    super().__init__(seed, **kw)
    self.order, self.vocab_size, self.alpha = int(order), int(vocab_size), float(alpha)
    if not 2 <= self.vocab_size <= 256:
      raise ValueError(f"markov.vocab_size must be in [2, 256], got {vocab_size}")
    self.num_states = self.vocab_size ** self.order
    if self.num_states * self.vocab_size > 2 ** 24:
      raise ValueError(f"markov table V^(k+1) = {self.num_states * self.vocab_size} too large")
    rng = np.random.default_rng([seed if table_seed < 0 else table_seed, TABLE_STREAM])
    table = rng.dirichlet(np.full(self.vocab_size, self.alpha), size=self.num_states)
    table = np.maximum(table, 1e-9)
    self.table = table / table.sum(-1, keepdims=True)
    self.log_table = np.log(self.table)
    self._cdf = np.cumsum(self.table, -1)
    self._cdf[:, -1] = 1.0

  def stationary(self, tol=1e-13, max_iter=100_000):
    """Stationary distribution over the V^k states by power iteration.

    A state s = (x_{t-k}..x_{t-1}) moves to s' = (x_{t-k+1}..x_t): joint[s, x] = pi(s) T[s, x]
    summed over the dropped oldest token gives pi'(s')."""
    v, s = self.vocab_size, self.num_states
    pi = np.full(s, 1.0 / s)
    for _ in range(max_iter if self.order else 0):
      new = (pi[:, None] * self.table).reshape(v, s // v, v).sum(0).reshape(-1)
      if np.abs(new - pi).sum() < tol:
        return new
      pi = new
    return pi

  def entropy_rate(self):
    """H = -sum_s pi(s) sum_x T[s, x] log T[s, x] (nats per token)."""
    return float(-(self.stationary()[:, None] * self.table * self.log_table).sum())

  def _generate(self, rngs, length):
    v, k = self.vocab_size, self.order
    u = np.stack([r.random(length + 1) for r in rngs])  # inverse-CDF sampling, per row
    b = u.shape[0]
    seq = np.zeros((b, length + 1), np.int32)
    nll = np.full((b, length + 1), math.log(v), np.float32)
    kk = min(k, length + 1)
    seq[:, :kk] = np.minimum((u[:, :kk] * v).astype(np.int32), v - 1)
    state = np.zeros(b, np.int64)
    for t in range(kk):
      state = (state * v + seq[:, t]) % self.num_states
    for t in range(kk, length + 1):  # sequential in t, vectorised over the batch
      tok = np.minimum((u[:, t:t + 1] > self._cdf[state]).sum(-1), v - 1)
      seq[:, t] = tok
      nll[:, t] = -self.log_table[state, tok]
      state = (state * v + tok) % self.num_states
    return {"seq": seq, "nll": nll}
