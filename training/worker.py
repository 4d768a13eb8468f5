"""One job pinned to one CPU core (training/workers.py starts these):

  python -m training.worker CORE < pickle.dumps((module, function, args))
"""
import importlib
import os
import pickle
import sys


def main(argv):
  cpu = int(argv[1])
  os.sched_setaffinity(0, {cpu})  # before jax starts: its thread pools size from this mask
  module, function, args = pickle.load(sys.stdin.buffer)
  print(f"worker pid {os.getpid()} pinned to core {cpu}: {module}.{function}", flush=True)
  getattr(importlib.import_module(module), function)(*args)


if __name__ == "__main__":
  from training.allocator import reexec_with_huge_pages
  reexec_with_huge_pages()
  main(sys.argv)
