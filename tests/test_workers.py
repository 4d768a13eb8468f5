"""training/workers.py: one process per core, dependencies, failures (the demo's runs
and sweep parts use it); demo.py's schedule estimate."""
import json
import os
import types

import pytest

import demo
from training import workers


def test_cpu_slots_one_per_core_or_in_process(monkeypatch):
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 5})
  assert workers.cpu_slots(0) == [0, 1, 2, 5]  # one worker per usable core
  assert workers.cpu_slots(2) == [0, 1]
  assert workers.cpu_slots(1) == []  # in this process
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
  assert workers.cpu_slots(0) == []  # one core: nothing to gain from a worker
  with pytest.raises(ValueError, match="workers=-1; valid"):
    workers.cpu_slots(-1)


def _task(tmp_path, name, function, *args, after=None):
  return workers.Task(name, str(tmp_path / f"{name}.log"), "tests.worker_helpers", function,
                      lambda: args, after)


def test_pool_pins_each_worker_orders_dependants_and_reports_failures(tmp_path):
  out = lambda name: str(tmp_path / f"{name}.json")
  a = _task(tmp_path, "a", "stamp", out("a"), 1.0)
  b = _task(tmp_path, "b", "stamp", out("b"), after=a)  # starts from a (a fine-tune)
  c = _task(tmp_path, "c", "fail", "c broke")
  d = _task(tmp_path, "d", "stamp", out("d"), after=c)
  cores = sorted(os.sched_getaffinity(0))[:2]
  with pytest.raises(RuntimeError) as err:
    workers.run_pool([a, b, c, d], cores)
  message = str(err.value)
  assert "c (log: " in message and "skipped: d (needs c)" in message and "a (log" not in message
  assert "c broke" in open(c.log).read()  # the worker's traceback is in its log
  assert not os.path.exists(out("d"))  # skipped: what it starts from failed
  got = {n: json.load(open(out(n))) for n in "ab"}
  assert all(len(s["cores"]) == 1 and s["cores"][0] in cores for s in got.values())
  assert got["b"]["start"] >= got["a"]["end"]  # only after a finished


def test_one_worker_per_core_serves_its_runs_and_survives_a_failed_one(tmp_path):
  out = lambda name: str(tmp_path / f"{name}.json")
  core = sorted(os.sched_getaffinity(0))[:1]
  tasks = [_task(tmp_path, "a", "stamp", out("a")), _task(tmp_path, "bad", "fail", "oops"),
           _task(tmp_path, "b", "stamp", out("b")), _task(tmp_path, "crash", "die"),
           _task(tmp_path, "c", "stamp", out("c"))]
  with pytest.raises(RuntimeError, match=r"failed: bad \(log: .*crash \(log: "):
    workers.run_pool(tasks, core)
  pid = {n: json.load(open(out(n)))["pid"] for n in "abc"}
  assert pid["a"] == pid["b"]  # the same process, after a run that raised
  assert pid["c"] != pid["b"]  # a fresh worker after one that died
  assert "oops" in open(tasks[1].log).read() and "oops" not in open(tasks[2].log).read()


def test_plan_estimate_schedules_runs_on_the_workers_and_fine_tunes_after_their_source():
  job = lambda s, source=None: types.SimpleNamespace(s=s, source=source)
  first = job(10)
  jobs = [first, job(10), job(10), job(5, source=first)]
  secs = lambda j: j.s
  assert demo._makespan(jobs, secs, 1) == 35
  # 2 workers: [first, third] and [second, fine-tune of first from t=10]
  assert demo._makespan(jobs, secs, 2) == 20
  late = [job(10), job(30), job(5, source=None)]
  late[2].source = late[1]
  assert demo._makespan(late, secs, 2) == 35  # waits for its source, not for a free worker


def test_task_whose_arguments_fail_raises_before_its_worker_starts(tmp_path):
  bad = workers.Task("bad", str(tmp_path / "bad.log"), "tests.worker_helpers", "stamp",
                     lambda: {}["missing config"])
  with pytest.raises(KeyError, match="missing config"):
    workers.run_pool([bad], sorted(os.sched_getaffinity(0))[:2])
  assert not os.path.exists(bad.log)  # no worker was started (none left waiting on stdin)
