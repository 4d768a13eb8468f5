"""Functions that tests/test_workers.py runs in worker processes (importable by them)."""
import json
import os
import time


def stamp(path, seconds=0.0):
  """Writes when it started and ended and the cores this process may use."""
  start = time.time()
  time.sleep(seconds)
  with open(path, "w") as f:
    json.dump({"start": start, "end": time.time(), "cores": sorted(os.sched_getaffinity(0)),
               "pid": os.getpid()}, f)


def fail(message):
  raise RuntimeError(message)


def die():
  os._exit(3)  # a crash: no exception, no answer
