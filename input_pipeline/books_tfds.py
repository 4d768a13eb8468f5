"""The shipped books corpus (`data/books/`) as a TFDS dataset, with no TensorFlow.

One example per book: {"text": whole book (str), "title": str, "file": str}. Splits come from
`MANIFEST.tsv` (train/validation/test). The gzip copies are checked against the manifest's
byte count and SHA-256 of the uncompressed text while generating; a mismatch raises ValueError.

Prepared once as array_record into `data_dir` (see `resolve_data_dir`) and read back with
`builder.as_data_source()` (random access, no tf.data). A whole book (<= ~1.8 MB) is a single
array_record record, which array_record handles fine (records up to GBs), so no chunking.
"""
import csv
import fcntl
import gzip
import hashlib
import os
import pathlib

import tensorflow_datasets as tfds

# data/books/ next to this package: the repo's own copy, so a fresh clone works offline.
BOOKS_DIR = pathlib.Path(__file__).resolve().parent.parent / "data" / "books"
SPLITS = ("train", "validation", "test")


def resolve_data_dir(data_dir=None):
  """TFDS cache dir: explicit arg > $LENX_DATA_DIR > ~/.cache/lenx/tensorflow_datasets."""
  d = data_dir or os.environ.get("LENX_DATA_DIR") or "~/.cache/lenx/tensorflow_datasets"
  return os.path.expanduser(str(d))


def read_manifest(books_dir=BOOKS_DIR):
  """Rows of MANIFEST.tsv as dicts (file,title,author,source,bytes,sha256,split)."""
  with open(pathlib.Path(books_dir) / "MANIFEST.tsv", newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f, delimiter="\t"))


def read_book(books_dir, row):
  """Uncompressed bytes of one manifest row, verified against its size and SHA-256."""
  path = pathlib.Path(books_dir) / (row["file"] + ".gz")
  if not path.exists():  # also accept a plain .txt copy (e.g. ../shared/data/books)
    path = pathlib.Path(books_dir) / row["file"]
  data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
  digest = hashlib.sha256(data).hexdigest()
  if len(data) != int(row["bytes"]) or digest != row["sha256"]:
    raise ValueError(
        f"{path}: content does not match MANIFEST.tsv (bytes {len(data)} vs {row['bytes']}, "
        f"sha256 {digest} vs {row['sha256']}); the corpus copy is corrupt or was edited.")
  return data


class LenxBooks(tfds.core.GeneratorBasedBuilder):
  """18 public-domain books, one example per book; see data/books/README.md."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: 18 books, manifest splits."}

  def __init__(self, *, books_dir=BOOKS_DIR, **kwargs):
    self._books_dir = pathlib.Path(books_dir)
    super().__init__(**kwargs)

  def _info(self):
    # A builder defined outside the TFDS package must build DatasetInfo directly
    # (self.dataset_info_from_configs looks for metadata files next to the module).
    return tfds.core.DatasetInfo(
        builder=self,
        description="Public-domain books (lenx data/books), one example per book.",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "title": tfds.features.Text(),
            "file": tfds.features.Text(),
        }),
        homepage="https://www.gutenberg.org",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: the corpus ships with the repo
    rows = read_manifest(self._books_dir)
    return {s: self._generate_examples([r for r in rows if r["split"] == s]) for s in SPLITS}

  def _generate_examples(self, rows):
    for row in rows:
      text = read_book(self._books_dir, row).decode("utf-8")
      yield row["file"], {"text": text, "title": row["title"], "file": row["file"]}


def load_books(split, data_dir=None, books_dir=BOOKS_DIR):
  """Prepare (first call only) and return the TFDS data source for `split`.

  Returns a random-access sequence of dicts {"text","title","file"} (text fields as bytes).
  """
  root = resolve_data_dir(data_dir)
  os.makedirs(root, exist_ok=True)
  # Several processes (parallel tests, concurrent runs) may prepare at once: an exclusive
  # lock makes one prepare while the others wait, then find it ready.
  with open(os.path.join(root, ".lenx_books.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    builder = LenxBooks(data_dir=root, books_dir=books_dir)
    # download_and_prepare is a no-op when the prepared version is already in data_dir.
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder.as_data_source(split=split)
