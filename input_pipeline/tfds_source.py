"""Any TFDS dataset by name with a text feature (data.name='tfds'), read via tfds.data_source.

If the dataset is already prepared (array_record) in data_dir it is read offline. Otherwise it
is downloaded and prepared, but only after a 3 s connectivity probe: TFDS would otherwise retry
downloads for minutes before failing offline, so we fail fast with instructions instead.
"""
import functools
import socket
import threading
import urllib.parse

import tensorflow_datasets as tfds

from input_pipeline import base

PROBE_TIMEOUT_S = 3.0
# storage.googleapis.com serves TFDS's own mirrors and many datasets (pg19 included).
DEFAULT_PROBE_HOSTS = ("storage.googleapis.com",)


def internet_reachable(hosts, timeout=PROBE_TIMEOUT_S) -> bool:
  """True if a TCP connection to any host:443 succeeds within `timeout` seconds overall.

  Runs in a daemon thread so a hanging DNS lookup cannot exceed the timeout either.
  """
  ok = threading.Event()

  def probe():
    for host in hosts:
      try:
        socket.create_connection((host, 443), timeout=timeout).close()
        ok.set()
        return
      except OSError:
        continue

  t = threading.Thread(target=probe, daemon=True)
  t.start()
  t.join(timeout)
  return ok.is_set()


def _probe_hosts(builder):
  host = urllib.parse.urlparse(builder.info.homepage or "").hostname
  return DEFAULT_PROBE_HOSTS + ((host,) if host else ())


def prepare_command(name, data_dir):
  return (f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
          f"data_dir='{data_dir}').download_and_prepare(file_format='array_record')\", "
          f"then copy {data_dir}/{name.split('/')[0]} to this machine")


def load_source(name, split, data_dir):
  """tfds data source for name/split, preparing it first if needed and possible."""
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    if not internet_reachable(_probe_hosts(builder)):
      raise RuntimeError(
          f"dataset {name} is not prepared in {data_dir} and the internet is unreachable; "
          f"prepare it on a machine with internet ({prepare_command(name, data_dir)}) "
          f"or use data.name='books' (shipped with the repo)")
    builder.download_and_prepare(file_format="array_record")
  return builder.as_data_source(split=split)


@functools.lru_cache(maxsize=16)
def tfds_docs(name, text_key, data_dir, split):
  """Docs (uint8 byte tokens) of feature `text_key` for every example of the split."""
  source = load_source(name, split, data_dir)
  docs = []
  for i in range(len(source)):
    ex = source[i]
    if text_key not in ex:
      raise ValueError(f"dataset {name} has no feature {text_key!r}; features: {sorted(ex)}")
    docs.append(base.encode(ex[text_key]))
  return tuple(docs)
