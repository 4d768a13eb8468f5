"""Byte-level text tasks: books (shipped corpus via TFDS), a directory of .txt files, or any
TFDS dataset by name. Tokenizer: UTF-8 bytes, vocab 256 (token = byte value), or with
``data.tokenizer`` a pretrained checkpoint's BPE (``input_pipeline.tokenizer``).

text_dir split rule: if the directory has a MANIFEST.tsv with `file` and `split` columns, it
decides; otherwise a file goes to split by h = int(sha256(relative path)[:8], 16) % 10:
h < 8 -> train, h == 8 -> validation, h == 9 -> test (~80/10/10, stable across machines).
`.txt` and gzip-compressed `.txt.gz` files are read; text must be valid UTF-8.
"""
import csv
import functools
import gzip
import hashlib
import pathlib

import numpy as np

from input_pipeline import base
from input_pipeline import books_tfds
from input_pipeline import tfds_source
from input_pipeline import tokenizer


encode, decode = base.encode, base.decode


@functools.lru_cache(maxsize=16)
def books_docs(split, data_dir, books_dir):
  """Docs of the shipped books corpus, sorted by file name (prepares TFDS on first use)."""
  source = books_tfds.load_books(split, data_dir=data_dir or None,
                                 books_dir=books_dir or books_tfds.BOOKS_DIR)
  examples = sorted((source[i] for i in range(len(source))), key=lambda ex: ex["file"])
  return tuple(encode(ex["text"]) for ex in examples)


def read_utf8_file(path) -> bytes:
  """Bytes of a .txt or .txt.gz file; ValueError naming file and byte offset if not UTF-8."""
  path = pathlib.Path(path)
  data = path.read_bytes()
  if path.suffix == ".gz":
    data = gzip.decompress(data)
  try:
    data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not valid UTF-8 at byte offset {e.start} "
                     f"(byte 0x{data[e.start]:02x}); convert the file to UTF-8") from None
  return data


def hash_split(name: str) -> str:
  h = int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:8], 16) % 10
  return "train" if h < 8 else ("validation" if h == 8 else "test")


def text_dir_splits(text_dir):
  """{relative file name: split} for all .txt / .txt.gz files under text_dir (recursive)."""
  root = pathlib.Path(text_dir).expanduser()
  if not root.is_dir():
    raise ValueError(f"data.text_dir={str(text_dir)!r} is not a directory")
  files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                 if p.is_file() and (p.name.endswith(".txt") or p.name.endswith(".txt.gz")))
  manifest = root / "MANIFEST.tsv"
  by_manifest = {}
  if manifest.exists():
    with open(manifest, newline="", encoding="utf-8") as f:
      by_manifest = {r["file"]: r["split"] for r in csv.DictReader(f, delimiter="\t")}
  out = {}
  for name in files:
    key = name[:-3] if name.endswith(".gz") else name  # manifest names the uncompressed file
    out[name] = by_manifest.get(key) or hash_split(key)
  return out


@functools.lru_cache(maxsize=16)
def text_dir_docs(text_dir, split):
  root = pathlib.Path(text_dir).expanduser()
  names = [n for n, s in text_dir_splits(text_dir).items() if s == split]
  if not names:
    raise ValueError(f"text_dir {text_dir!r} has no files in split {split!r} "
                     "(rule: MANIFEST.tsv if present, else sha256(file name) % 10: "
                     "0-7 train, 8 validation, 9 test)")
  return tuple(encode(read_utf8_file(root / n)) for n in names)


KEY_SYMBOLS = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz0123456789", np.uint8)


def repeat_span(window, rng, min_len=8):
  """``window`` with a span of random letters and digits written into it and repeated
  later in the same window: span length, source and target drawn at random, so the
  distance between the two copies varies (from the span's length to the window's) and
  only matching content, not a fixed offset, finds the earlier copy. Olsson et al. 2022
  ("In-context learning and induction heads", sec. 2) measure induction heads on repeated
  random tokens. Measured on the demo's 2-layer RoPE model (results/needle_demo/README.md):
  a fixed layout (first half, then its repeat) is learnt as a head attending half a window
  back, which copies and retrieves nothing; repeated *book text* at 50 % of the windows
  formed no induction head in 2800 steps of 16 windows; random spans in every window did
  (copy loss 3.6 -> 0.25 nats between steps 1600 and 2000)."""
  n = len(window)
  span = int(rng.integers(min_len, n // 2 + 1))
  src = int(rng.integers(0, n - 2 * span + 1))
  dst = int(rng.integers(src + span, n - span + 1))
  out = np.array(window)
  out[src:src + span] = rng.choice(KEY_SYMBOLS, span)
  out[dst:dst + span] = out[src:src + span]
  return out


class TextTask(base.Task):
  """Next-byte prediction on documents; train windows uniform over token starts."""

  vocab_size = 256
  is_text = True

  def __init__(self, name, seed, docs_fn, tokenizer=None, needle_fraction=0.0,
               repeat_fraction=0.0, repeat_warmup_steps=0, needle_min_fraction=1.0,
               needle_keep_distances=False):
    super().__init__(seed)
    for field, value in (("needle_fraction", needle_fraction),
                         ("repeat_fraction", repeat_fraction)):
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"data.{field} must be in [0, 1], got {value}")
    if not 0.0 < needle_min_fraction <= 1.0:
      raise ValueError("data.needle_min_fraction must be in (0, 1] (1 = every pass-key example "
                       f"fills its window), got {needle_min_fraction}")
    self.needle_min_fraction = float(needle_min_fraction)
    self.needle_keep_distances = bool(needle_keep_distances)
    if needle_fraction + repeat_fraction > 1.0:
      raise ValueError("data.needle_fraction + data.repeat_fraction must be <= 1, got "
                       f"{needle_fraction} + {repeat_fraction}")
    self.name, self.needle_fraction = name, float(needle_fraction)
    self.repeat_fraction = float(repeat_fraction)
    self.repeat_warmup_steps = int(repeat_warmup_steps)
    self._docs_fn = docs_fn  # split -> tuple of uint8 arrays (cached by the loader)
    self._flat = None
    self.tokenizer, self._tokenized = tokenizer, {}
    if tokenizer is not None:  # BPE tokens: vocab and each token's bytes (bits per byte)
      self.vocab_size, self.token_bytes = tokenizer.vocab_size, tokenizer.token_bytes
    else:
      self.token_bytes = None  # one byte per token

  def eval_docs(self, split):
    """All documents of `split` as a list of uint8 token arrays."""
    base.check_split(split)
    if self.tokenizer is None:
      return list(self._docs_fn(split))
    if split not in self._tokenized:  # BPE over each whole document (UTF-8 checked on read)
      self._tokenized[split] = [self.tokenizer.encode(bytes(doc).decode("utf-8"))
                                for doc in self._docs_fn(split)]
    return list(self._tokenized[split])

  def _train_flat(self):
    if self._flat is None:  # concatenated train docs, for one fancy-index gather per batch
      docs = self.eval_docs("train")
      lens = np.array([len(d) for d in docs], np.int64)
      starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
      self._flat = (np.concatenate(docs), starts, lens)
    return self._flat

  def train_batch(self, step, batch_size, length):
    """Random windows of L+1 train tokens; rng = default_rng([seed, step])."""
    rng = np.random.default_rng([self.seed, int(step)])
    flat, starts, lens = self._train_flat()
    windows = base.sample_train_windows(flat, starts, lens, rng, batch_size, length)
    # the induction warm-up: only repeat windows for the first repeat_warmup_steps
    fractions = ((0.0, 1.0) if step < self.repeat_warmup_steps
                 else (self.needle_fraction, self.repeat_fraction))
    if any(fractions):
      windows = self._mixture(windows, flat, rng, *fractions)
    return base.windows_to_batch(windows, length)

  def _mixture(self, windows, flat, rng, needle_fraction, repeat_fraction):
    """The retrieval training mixture of issue 13. One uniform draw u per window:
    u < needle_fraction: a pass-key example of the same length
    (``evaluation.needle.make_example``: train text as filler, the needle at a uniform
    depth, then the question and the key), so a model learns retrieval within its training
    length and the question is whether it survives beyond;
    needle_fraction <= u < needle_fraction + repeat_fraction: a span of the window copied
    further on (``repeat_span``), the repeated-text setting in which Olsson et al. 2022
    ("In-context learning and induction heads", sec. 2) measure induction heads: every byte
    of the copy is predictable by copying, a dense signal for the copy mechanism that a
    5-byte key alone gives too rarely. Drawn from the batch's own rng: still a pure
    function of (seed, step)."""
    from evaluation import needle  # here: evaluation imports models, which need jax
    encode = self.tokenizer.encode if self.tokenizer is not None else base.encode
    windows = np.array(windows)
    u = rng.random(len(windows))
    sizes = needle.example_sizes(encode)
    for row in np.flatnonzero(u < needle_fraction):
      n, depth = self._needle_layout(windows.shape[1], sizes, rng)
      ex = needle.make_example(flat, encode, n, depth, rng, distractors=0)
      windows[row, :n] = ex["tokens"]  # n < the window: its own text continues after the key
    for row in np.flatnonzero((u >= needle_fraction) & (u < needle_fraction + repeat_fraction)):
      windows[row] = repeat_span(windows[row], rng)
    return windows

  def _needle_layout(self, window, sizes, rng):
    """(tokens, depth) of one pass-key example: the whole window at a uniform depth, or with
    needle_min_fraction < 1 a uniform length in [max(fraction x window, shortest), window],
    so that the question and key also sit at earlier positions after less context (a model
    trained only on full windows fails the first key digit of shorter prompts:
    results/needle_longwarm/README.md, section 3). Shorter examples also put the needle
    fewer tokens back; needle_keep_distances draws that distance as a full window would
    (``needle.layout`` at a uniform depth) and then a length that holds it, so only where
    the question sits changes. At fraction 1 the draws are the full-window stream's."""
    if self.needle_min_fraction >= 1.0:
      return window, rng.random()
    shortest, key = sum(sizes), sizes[-1]
    low = min(window, max(int(np.ceil(self.needle_min_fraction * window)), shortest))
    if not self.needle_keep_distances:
      return int(rng.integers(low, window + 1)), rng.random()
    from evaluation import needle  # as in _mixture
    _, at, answer_at = needle.layout(*sizes, window, rng.random())
    distance = answer_at - at  # >= needle + question: the needle fits any length >= it + key
    n = int(rng.integers(max(low, distance + key), window + 1))
    return n, (n - key - distance) / max(n - shortest, 1)  # needle at n - key - distance

  def eval_batches(self, split, length, batch_size, max_tokens=None):
    """Deterministic per-document windows; see base.eval_windows (adds doc_id, offset)."""
    return base.batched_eval(self.eval_docs(split), length, batch_size, max_tokens)


def make_text_task(cfg, seed):
  """TextTask for cfg.name in {books, text_dir, tfds}."""
  name = cfg["name"]
  if name == "books":
    data_dir = books_tfds.resolve_data_dir(cfg.get("data_dir") or None)
    fn = functools.partial(_books_split, data_dir, cfg.get("books_dir") or "")
  elif name == "text_dir":
    if not cfg.get("text_dir"):
      raise ValueError("data.name='text_dir' needs data.text_dir=PATH")
    fn = functools.partial(_text_dir_split, str(cfg["text_dir"]))
  else:
    data_dir = books_tfds.resolve_data_dir(cfg.get("data_dir") or None)
    fn = functools.partial(tfds_source.tfds_docs, cfg["tfds_name"], cfg["text_key"], data_dir)
  tok = tokenizer.load(cfg["tokenizer"]) if cfg.get("tokenizer") else None
  return TextTask(name, seed, fn, tok, cfg.get("needle_fraction", 0.0),
                  cfg.get("repeat_fraction", 0.0), cfg.get("repeat_warmup_steps", 0),
                  cfg.get("needle_min_fraction", 1.0), cfg.get("needle_keep_distances", False))


def _books_split(data_dir, books_dir, split):
  return books_docs(split, data_dir, books_dir)


def _text_dir_split(text_dir, split):
  return text_dir_docs(text_dir, split)
