"""A worker pinned to one CPU core, running jobs one after another (training/workers.py):

  python -m training.worker CORE

It reads pickled (log, module, function, args) jobs from stdin until EOF, runs
``module.function(*args)`` with its output appended to ``log``, and answers one line per
job on its original stdout: "ok" or "failed" (the traceback is in the log). One process
serves many jobs, so jax, the models and the compiled programs are imported and loaded once
per core, not once per run.
"""
import contextlib
import importlib
import os
import pickle
import sys
import traceback


@contextlib.contextmanager
def output_to(path):
  """File descriptors 1 and 2 (print, tqdm, absl, C++ code) appended to ``path``."""
  sys.stdout.flush()
  sys.stderr.flush()
  saved = os.dup(1), os.dup(2)
  with open(path, "ab") as log:
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
  try:
    yield
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, copy in zip((1, 2), saved):
      os.dup2(copy, fd)
      os.close(copy)


def run_job(cpu, log, module, function, args):
  """True when ``module.function(*args)`` returned, False when it raised (logged)."""
  with output_to(log):
    print(f"worker pid {os.getpid()} pinned to core {cpu}: {module}.{function}", flush=True)
    try:
      getattr(importlib.import_module(module), function)(*args)
      return True
    except Exception:  # a failed run is reported and the worker takes the next one
      traceback.print_exc()
      return False


def main(argv):
  cpu = int(argv[1])
  os.sched_setaffinity(0, {cpu})  # before jax starts: its thread pools size from this mask
  answers = os.fdopen(os.dup(1), "w")  # stays the pool's pipe while jobs redirect fd 1
  while True:
    try:
      job = pickle.load(sys.stdin.buffer)
    except EOFError:
      return
    answers.write(("ok" if run_job(cpu, *job) else "failed") + "\n")
    answers.flush()


if __name__ == "__main__":
  from training.allocator import reexec_with_huge_pages
  reexec_with_huge_pages()
  main(sys.argv)
