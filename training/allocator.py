"""Transparent huge pages for malloc (glibc), so a step's large temporaries cost ~1/500 of
the page faults.

Why: XLA:CPU allocates one temporary buffer per executable run (94 MB for a train step of
the demo's model at batch 32) on a worker thread. glibc serves a block that large with a
fresh ``mmap`` and ``munmap``s it on free, so every step faults in 4 KB pages again:
measured on a 2-core AMD EPYC (AVX2, KVM, Linux 6.18, glibc 2.36), 23,400 minor faults and
~90 ms of kernel time per 240 ms step. glibc's tunable ``glibc.malloc.hugetlb=1`` (glibc
>= 2.35) makes malloc ``madvise`` its memory for transparent huge pages: ~500 faults per
step, ~25 ms of kernel time, train steps 12-17 % faster, peak memory within 2 % (keeping
freed memory in the process with ``mallopt`` instead was as fast but held 30-70 % more
memory through fragmentation; benchmarks/README.md). Tunables are read when a process
starts, so a script re-executes itself once with the tunable added.
``LENX_MALLOC=system`` (or THP turned off in the kernel, or a non-glibc C library) leaves
the process as it is.
"""
import ctypes
import ctypes.util
import os
import sys

TUNABLE = "glibc.malloc.hugetlb"
CHOICES = ("auto", "system")
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_version():
  """(major, minor) of the C library when it is glibc, else None."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    version = libc.gnu_get_libc_version
  except (OSError, AttributeError):
    return None
  version.restype = ctypes.c_char_p
  return tuple(int(x) for x in version().decode().split(".")[:2])


def _thp_mode(path=THP_MODE):
  """The kernel's THP mode ("always", "madvise", "never"), or None if unknown."""
  try:
    text = open(path, encoding="ascii").read()
  except OSError:
    return None
  return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def huge_pages_env(environ=None, glibc=None, thp=None):
  """(environment with the tunable added, why) when re-executing would turn it on, else
  (None, why not)."""
  environ = os.environ if environ is None else environ
  choice = environ.get("LENX_MALLOC", "auto")
  if choice not in CHOICES:
    raise ValueError(f"LENX_MALLOC={choice!r}; valid choices: {', '.join(CHOICES)}")
  tunables = environ.get("GLIBC_TUNABLES", "")
  glibc = _glibc_version() if glibc is None else glibc
  thp = _thp_mode() if thp is None else thp
  if choice == "system":
    return None, "LENX_MALLOC=system"
  if TUNABLE in tunables:
    return None, f"GLIBC_TUNABLES has {TUNABLE} already"
  if glibc is None or glibc < (2, 35):
    return None, f"C library is not glibc >= 2.35 (found {glibc})"
  if thp not in ("always", "madvise"):
    return None, f"transparent huge pages are {thp!r} in this kernel"
  value = ":".join(filter(None, (tunables, f"{TUNABLE}=1")))
  return {**environ, "GLIBC_TUNABLES": value}, f"GLIBC_TUNABLES={value}"


def reexec_with_huge_pages():
  """Re-executes this script (same interpreter and arguments) with the tunable, once; a
  no-op where ``huge_pages_env`` says it would not help. Call first in ``__main__``."""
  env, _ = huge_pages_env()
  if env is not None:
    sys.stdout.flush(), sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + sys.orig_argv[1:], env)
