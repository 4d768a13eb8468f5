"""training/allocator.py: scripts re-execute once with glibc's malloc on transparent huge
pages, so a step's large temporaries (XLA:CPU's per-run buffer) fault ~1/500 of the pages."""
import os
import subprocess
import sys

import pytest

from training import allocator

# In a fresh process: a worker thread allocates, touches and frees 96 MB three times, as
# XLA's thread does per step; prints the minor page faults of the last two rounds.
_ROUNDS = """
import ctypes, resource, threading
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
faults = []
def rounds():
  for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(96 << 20)
    ctypes.memset(p, 1, 96 << 20)
    libc.free(p)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
t = threading.Thread(target=rounds)
t.start(); t.join()
print(sum(faults[1:]))
"""


def _faults(env):
  out = subprocess.run([sys.executable, "-c", _ROUNDS], env=env, capture_output=True, text=True,
                       check=True)
  return int(out.stdout.split()[-1])


def test_the_tunable_cuts_page_faults_where_it_is_applied():
  plain = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LENX_MALLOC")}
  env, why = allocator.huge_pages_env(plain)
  pages = 2 * (96 << 20) // 4096  # 49,152 fresh 4 KB pages in two rounds
  assert _faults(plain) > pages // 2  # glibc's default: a fresh mmap per round
  if env is None:  # no glibc >= 2.35 or no THP here: the scripts leave the process alone
    assert "glibc" in why or "huge pages" in why
  else:
    assert _faults(env) < pages // 20


def test_environment_and_choices():
  glibc, thp = (2, 36), "madvise"
  env, why = allocator.huge_pages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, glibc, thp)
  assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
  done = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
  assert allocator.huge_pages_env(done, glibc, thp)[0] is None  # no second re-exec
  assert allocator.huge_pages_env({"LENX_MALLOC": "system"}, glibc, thp)[0] is None
  assert allocator.huge_pages_env({}, (2, 31), thp)[0] is None  # tunable added in glibc 2.35
  assert allocator.huge_pages_env({}, glibc, "never")[0] is None
  with pytest.raises(ValueError, match="LENX_MALLOC='jemalloc'; valid choices: auto, system"):
    allocator.huge_pages_env({"LENX_MALLOC": "jemalloc"}, glibc, thp)


def test_a_script_reexecutes_itself_once_with_the_tunable(tmp_path):
  script = tmp_path / "script.py"
  script.write_text("import os, sys\nsys.path.insert(0, sys.argv[1])\n"
                    "from training.allocator import reexec_with_huge_pages\n"
                    "print('start', os.environ.get('GLIBC_TUNABLES', ''), sys.argv[2:], flush=True)\n"
                    "reexec_with_huge_pages()\n")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LENX_MALLOC")}
  out = subprocess.run([sys.executable, str(script), root, "--flag=x"], env=env,
                       capture_output=True, text=True, check=True).stdout.splitlines()
  if allocator.huge_pages_env(env)[0] is None:
    assert out == ["start  ['--flag=x']"]
  else:  # the second start has the tunable and the same arguments, and does not exec again
    assert out == ["start  ['--flag=x']", "start glibc.malloc.hugetlb=1 ['--flag=x']"]
