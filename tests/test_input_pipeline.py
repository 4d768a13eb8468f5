"""Tests for input_pipeline (fast, offline; run serially)."""
import gzip
import hashlib
import time

import numpy as np
import pytest

import input_pipeline as ip
from input_pipeline import books_tfds
from input_pipeline import text as text_lib


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def books(data_dir):
  return ip.get_task({"name": "books", "data_dir": data_dir}, seed=0)


def test_books_tfds_roundtrip_exact_bytes(data_dir):
  manifest = {r["file"]: r for r in books_tfds.read_manifest()}
  source = books_tfds.load_books("test", data_dir=data_dir)
  assert len(source) == 2
  for i in range(len(source)):
    ex = source[i]
    row = manifest[ex["file"].decode()]
    assert hashlib.sha256(ex["text"]).hexdigest() == row["sha256"]
    assert ex["title"].decode() == row["title"]
  # Second call reuses the prepared cache (no regeneration).
  t = time.time()
  assert len(books_tfds.load_books("test", data_dir=data_dir)) == 2
  assert time.time() - t < 5


def test_books_splits_follow_manifest(books):
  rows = books_tfds.read_manifest()
  for split in ("train", "validation", "test"):
    want = sorted(int(r["bytes"]) for r in rows if r["split"] == split)
    assert sorted(len(d) for d in books.eval_docs(split)) == want
  assert books.is_text and books.vocab_size == 256


def test_book_checksum_mismatch_raises(tmp_path):
  row = books_tfds.read_manifest()[0]
  (tmp_path / (row["file"] + ".gz")).write_bytes(gzip.compress(b"tampered"))
  with pytest.raises(ValueError, match="does not match MANIFEST"):
    books_tfds.read_book(tmp_path, row)


def test_train_batch_deterministic_and_shifted(books):
  a, b = books.train_batch(5, 4, 128), books.train_batch(5, 4, 128)
  c = books.train_batch(6, 4, 128)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["inputs"], c["inputs"])
  np.testing.assert_array_equal(a["inputs"][:, 1:], a["targets"][:, :-1])
  assert a["inputs"].dtype == np.int32 and a["loss_mask"].dtype == np.float32
  np.testing.assert_array_equal(a["positions"][1], np.arange(128))
  # Each window is a contiguous slice of one train doc.
  joined = b"\x00".join(d.tobytes() for d in books.eval_docs("train"))
  row = np.concatenate([a["inputs"][0], a["targets"][0, -1:]]).astype(np.uint8).tobytes()
  assert row in joined


def test_eval_windows_score_every_token_once():
  docs = [np.arange(1, 24) % 256, np.arange(5, 10), np.arange(3)]
  task = text_lib.TextTask("t", 0, lambda split: tuple(docs))
  seen = {i: [] for i in range(len(docs))}
  for batch in task.eval_batches("test", 8, 3):
    assert batch["inputs"].shape == (3, 8)
    for r in range(3):
      d, off = batch["doc_id"][r], batch["offset"][r]
      if d < 0:
        assert batch["loss_mask"][r].sum() == 0
        continue
      m = batch["loss_mask"][r] > 0
      np.testing.assert_array_equal(batch["targets"][r][m], docs[d][off + 1:off + 1 + m.sum()])
      seen[d].extend(off + 1 + np.flatnonzero(m))
  for d, doc in enumerate(docs):
    assert sorted(seen[d]) == list(range(1, len(doc)))
  limited = list(task.eval_batches("test", 8, 2, max_tokens=20))
  assert sum(b["loss_mask"].sum() for b in limited) == 16  # whole windows: 8 + 8 (<= 20)


def test_markov_optimal_nll_matches_entropy_rate():
  task = ip.get_task({"name": "markov", "markov": {"order": 2, "vocab_size": 16}}, seed=1)
  batch = task.train_batch(0, 8, 4096)
  assert batch["inputs"].max() < 16
  assert abs(batch["optimal_nll"][:, 64:].mean() - task.entropy_rate()) < 0.05
  np.testing.assert_allclose(task.stationary().sum(), 1.0)


def test_copy_deterministic_part():
  task = ip.get_task({"name": "copy", "copy": {"vocab_size": 8}}, seed=0)
  L, n = 64, 32
  b = task.train_batch(0, 4, L)
  seq = np.concatenate([b["inputs"], b["targets"][:, -1:]], 1)
  np.testing.assert_array_equal(seq[:, n + 1:], seq[:, :n])  # copy equals the prefix
  assert (seq[:, n] == task.sep).all()
  t = np.arange(L)
  assert (b["optimal_nll"][:, t + 1 >= n] == 0).all()
  np.testing.assert_allclose(b["optimal_nll"][:, t + 1 < n], np.log(8), rtol=1e-6)
  assert (b["answer_mask"][:, t + 1 > n] == 1).all() and b["answer_mask"][:, :n].sum() == 0


def test_passkey_answer_is_queried_value():
  task = ip.get_task({"name": "passkey"}, seed=3)
  L = 200
  b = task.train_batch(2, 8, L)
  assert np.all(b["answer_mask"].sum(1) == 1)
  for r in range(8):
    seq = np.concatenate([b["inputs"][r], b["targets"][r, -1:]])
    key, value = seq[-3:-1], seq[-1]
    assert seq[-4] == task.query
    r0 = (L + 1 - 4) % 3  # leading PAD tokens
    assert (seq[:r0] == task.pad).all()
    pairs = seq[r0:-4].reshape(-1, 3)
    hit = np.flatnonzero((pairs[:, :2] == key).all(1))
    assert len(hit) == 1 and pairs[hit[0], 2] == value
    stored_pos = r0 + 3 * hit[0] + 2
    assert b["passkey_distance"][r] == L - stored_pos
    assert b["optimal_nll"][r, -1] == 0 and b["answer_mask"][r, -1] == 1


def test_synthetic_eval_is_deterministic_and_padded():
  task = ip.get_task({"name": "passkey", "num_eval_sequences": 5}, seed=0)
  a = list(task.eval_batches("validation", 64, 4))
  b = list(task.eval_batches("validation", 64, 4))
  assert len(a) == 2 and a[1]["inputs"].shape == (4, 64)
  np.testing.assert_array_equal(a[1]["inputs"], b[1]["inputs"])
  assert a[1]["loss_mask"][1:].sum() == 0 and a[1]["passkey_distance"][1] == -1


def test_unknown_name_lists_choices():
  with pytest.raises(ValueError, match="books, text_dir, tfds, markov, copy, passkey"):
    ip.get_task({"name": "nope"}, seed=0)


def test_text_dir_split_and_non_utf8(tmp_path):
  for i in range(30):
    (tmp_path / f"doc{i}.txt").write_text(f"document {i} " * 20, encoding="utf-8")
  splits = text_lib.text_dir_splits(tmp_path)
  assert set(splits.values()) <= {"train", "validation", "test"}
  assert splits == text_lib.text_dir_splits(tmp_path)  # deterministic
  task = ip.get_task({"name": "text_dir", "text_dir": str(tmp_path)}, seed=0)
  assert len(task.eval_docs("train")) == sum(s == "train" for s in splits.values())
  (tmp_path / "bad.txt").write_bytes(b"hello \xff world")
  with pytest.raises(ValueError, match=r"bad\.txt: not valid UTF-8 at byte offset 6"):
    text_lib.read_utf8_file(tmp_path / "bad.txt")


def test_tfds_by_name_offline_fails_fast(tmp_path):
  task = ip.get_task({"name": "tfds", "tfds_name": "pg19", "data_dir": str(tmp_path)}, 0)
  t = time.time()
  with pytest.raises(RuntimeError, match="not prepared .* internet is unreachable"):
    task.eval_docs("test")
  assert time.time() - t < 15


def test_default_config_has_all_fields():
  c = ip.default_data_config()
  for key in ("name", "data_dir", "text_dir", "tfds_name", "text_key", "markov", "copy",
              "passkey"):
    assert key in c


def test_passkey_optimal_nll_is_exact_log_probability():
  # Keys without replacement: sum of key-token nll = log(N! / (N - m)!), N = K^J;
  # query key uniform over m pairs: its tokens' nll sum to log m.
  task = ip.get_task({"name": "passkey", "passkey": {"key_vocab": 4, "key_len": 2}}, seed=0)
  L = 3 * 12 + 3  # 12 pairs, no PAD
  b = task.train_batch(0, 2, L)
  nll = b["optimal_nll"][0].astype(np.float64)
  m, n_keys = 12, 16
  key_targets = [t for t in range(L) if (t + 1) % 3 != 2 and t + 1 < 3 * m]
  want = sum(np.log(n_keys - i) for i in range(m)) - np.log(4)  # x_0 is never a target
  np.testing.assert_allclose(nll[key_targets].sum(), want, rtol=1e-5)
  np.testing.assert_allclose(nll[-3:-1].sum(), np.log(m), rtol=1e-5)


def test_get_task_accepts_configdict():
  c = ip.default_data_config()
  c.name = "markov"
  c.markov.order = 1
  task = ip.get_task(c, seed=0)
  assert task.order == 1 and task.train_batch(0, 2, 16)["inputs"].shape == (2, 16)


def _window(batch, row):
  """The training window a batch row was cut from (its inputs, then the last target)."""
  return np.concatenate([batch["inputs"][row], batch["targets"][row][-1:]])


def test_needle_training_mixture_inserts_pass_keys_purely_in_seed_and_step():
  from evaluation import needle
  from input_pipeline import get_task
  plain = get_task({"name": "books"}, seed=3).train_batch(5, 16, 128)
  task = get_task({"name": "books", "needle_fraction": 1.0}, seed=3)
  batch = task.train_batch(5, 16, 128)
  again = task.train_batch(5, 16, 128)
  assert np.array_equal(batch["inputs"], again["inputs"])  # pure in (seed, step)
  question = needle.QUESTION.encode()
  for row in range(16):
    text = bytes(_window(batch, row).astype(np.uint8))
    key = text[-needle.KEY_DIGITS:]
    assert key.isdigit() and text[:-needle.KEY_DIGITS].endswith(question)
    assert needle.NEEDLE.format(key=key.decode()).encode() in text  # the needle it answers
  half = get_task({"name": "books", "needle_fraction": 0.5}, seed=3)
  rows = [bytes(r.astype(np.uint8)) for s in range(8) for r in half.train_batch(s, 16, 128)["inputs"]]
  share = np.mean([b" The pass key is " in r for r in rows])
  assert 0.3 < share < 0.7
  off = get_task({"name": "books", "needle_fraction": 0.0}, seed=3).train_batch(5, 16, 128)
  assert np.array_equal(off["inputs"], plain["inputs"])  # off = the plain stream, bitwise
  with pytest.raises(ValueError, match="needle_fraction must be in"):
    get_task({"name": "books", "needle_fraction": 1.5}, seed=3)


def test_shorter_pass_key_examples_end_anywhere_and_the_window_text_follows():
  """needle_min_fraction < 1: each example opens its window at a uniform length in
  [fraction x window, window] (never shorter than an example without filler), the key's
  position varies, and the window's own text follows the key; at 1 nothing is drawn, so
  the stream is bitwise the full-window one."""
  from evaluation import needle
  from input_pipeline import get_task
  cfg = {"name": "books", "needle_fraction": 1.0}
  plain = get_task({"name": "books"}, seed=3).train_batch(5, 16, 128)
  full = get_task(cfg, seed=3).train_batch(5, 16, 128)
  assert np.array_equal(get_task({**cfg, "needle_min_fraction": 1.0}, seed=3).train_batch(
      5, 16, 128)["inputs"], full["inputs"])
  question = needle.QUESTION.encode()
  shortest = sum(needle.example_sizes(lambda t: np.frombuffer(t.encode(), np.uint8)))
  ends = []
  for step in range(4):
    batch = get_task({**cfg, "needle_min_fraction": 0.25}, seed=3).train_batch(step, 16, 128)
    base = get_task({"name": "books"}, seed=3).train_batch(step, 16, 128)
    for row in range(16):
      window = _window(batch, row)
      text = bytes(window.astype(np.uint8))
      end = text.index(question, text.index(question) + 1) + len(question) + needle.KEY_DIGITS
      assert text[end - needle.KEY_DIGITS:end].isdigit() and shortest <= end <= 129
      key = text[end - needle.KEY_DIGITS:end].decode()
      assert needle.NEEDLE.format(key=key).encode() in text[:end]
      if end < 129:  # the window's own text continues after the key
        tail = _window(base, row)[end:]
        assert np.array_equal(window[end:], tail)
      ends.append(end)
  assert min(ends) < 80 and max(ends) > 110 and len(set(ends)) > 20
  assert not np.array_equal(full["inputs"], plain["inputs"])
  with pytest.raises(ValueError, match="needle_min_fraction must be in"):
    get_task({**cfg, "needle_min_fraction": 0.0}, seed=3)


def _needle_distances(cfg, steps=8):
  """How far back each training window's needle lies (its start to the key's first byte)."""
  from evaluation import needle
  from input_pipeline import get_task
  task, out = get_task(cfg, seed=3), []
  for step in range(steps):
    batch = task.train_batch(step, 16, 128)
    for row in range(16):
      text = bytes(_window(batch, row).astype(np.uint8))
      needle_at = text.index(needle.QUESTION.encode())  # the needle opens with the question
      end = text.index(needle.QUESTION.encode(), needle_at + 1) + len(needle.QUESTION)
      out.append(end - needle_at)
  return np.array(out)


def test_keeping_needle_distances_changes_only_where_the_question_sits():
  """Shorter examples put the needle nearer on average (distance 41 + (1 - depth) x filler);
  needle_keep_distances draws it as a full window does (uniform over 41..124 bytes) while
  the examples still end anywhere."""
  cfg = {"name": "books", "needle_fraction": 1.0}
  full = _needle_distances(cfg)
  short = _needle_distances({**cfg, "needle_min_fraction": 0.25})
  kept = _needle_distances({**cfg, "needle_min_fraction": 0.25, "needle_keep_distances": True})
  for d in (full, short, kept):
    assert d.min() >= 41 and d.max() <= 124
  assert abs(full.mean() - 82.5) < 7 and abs(kept.mean() - 82.5) < 7  # uniform 41..124
  assert short.mean() < 72  # 41 + E[(1 - depth) x filler] = 61.75 for lengths 46..129
  assert (kept > 110).mean() > 0.1 and (short > 110).mean() < 0.05


def test_repeat_span_copies_a_random_span_at_a_random_distance():
  from input_pipeline.text import KEY_SYMBOLS, repeat_span
  window = np.frombuffer(b"." * 129, np.uint8)  # "." is not among the span's symbols
  distances = set()
  for seed in range(40):
    out = repeat_span(window, np.random.default_rng(seed))
    changed = np.flatnonzero(out != window)
    assert np.isin(out[changed], KEY_SYMBOLS).all()  # only letters / digits written
    text = bytes(out)
    runs = [r for r in text.split(b".") if r]
    if len(runs) == 1:  # the copy starts right after the span: one run, two equal halves
      runs = [runs[0][:len(runs[0]) // 2], runs[0][len(runs[0]) // 2:]]
    assert len(runs) == 2 and runs[0] == runs[1] and len(runs[0]) >= 8
    first = text.index(runs[0])
    distances.add(text.index(runs[0], first + len(runs[0])) - first)
  assert len(distances) > 20  # not a fixed offset


def test_repeat_warmup_then_mixture():
  from input_pipeline import get_task
  cfg = {"name": "books", "needle_fraction": 0.5, "repeat_fraction": 0.25,
         "repeat_warmup_steps": 3}
  task = get_task(cfg, seed=1)
  plain = get_task({"name": "books"}, seed=1)
  warm = task.train_batch(2, 32, 128)["inputs"]
  assert not any(b" The pass key is " in bytes(r.astype(np.uint8)) for r in warm)
  assert (warm != plain.train_batch(2, 32, 128)["inputs"]).any(axis=1).all()  # every row a repeat
  later = [bytes(r.astype(np.uint8)) for s in range(3, 11) for r in task.train_batch(s, 16, 128)["inputs"]]
  share = np.mean([b" The pass key is " in r for r in later])
  assert 0.3 < share < 0.7
  with pytest.raises(ValueError, match="needle_fraction \\+ data.repeat_fraction must be <= 1"):
    get_task({"name": "books", "needle_fraction": 0.6, "repeat_fraction": 0.6}, seed=1)
