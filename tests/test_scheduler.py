"""The pipeline's generic scheduler on toy jobs: needs are respected, never more than `workers` run at once (one light
job beside them), an exclusive job runs alone (on every worker's share), and a failing job stops the run with its error, stopping
the jobs still running. The toy processes import nothing of nanoseek (the scheduler is imported inside the tests)
so that each spawned child starts in a fraction of a second."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _toy(out: str, name: str, seconds: float, exitcode: int, share: int) -> None:
    """A spawned toy job: sleep, then record when it ran (from inside the process) and exit with `exitcode`."""
    t0 = time.time()
    time.sleep(seconds)
    preloaded = "nanoseek.pipeline.scheduler" in sys.modules       # this module imports nothing of nanoseek
    Path(out, f"{name}.json").write_text(json.dumps({"start": t0, "end": time.time(), "share": share,
                                                     "preloaded": preloaded}))
    sys.exit(exitcode)


def _process(out, name, seconds=0.3, exitcode=0):
    return lambda share: (_toy, (str(out), name, seconds, exitcode, share))


def test_process_jobs_respect_needs_workers_and_exclusive_jobs(tmp_path):
    from nanoseek.pipeline.scheduler import Job, run_jobs

    jobs = {"a": Job(spawn=_process(tmp_path, "a")), "b": Job(spawn=_process(tmp_path, "b")),
            "c": Job(spawn=_process(tmp_path, "c")), "d": Job(("a", "b"), spawn=_process(tmp_path, "d")),
            "x": Job(("c",), spawn=_process(tmp_path, "x"), exclusive=True),
            "e": Job(("x",), spawn=_process(tmp_path, "e")), "f": Job(spawn=_process(tmp_path, "f"), light=True),
            "skip": Job(spawn=_process(tmp_path, "skip"))}
    started, finished, shown = [], [], []
    run_jobs(jobs, 2, done={"skip"}, on_start=lambda job, share: started.append((job, share)),
             on_done=lambda job, s: finished.append(job), show=shown.append, poll=0.05)
    ran = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert sorted(ran) == ["a", "b", "c", "d", "e", "f", "x"]                  # "skip" was done already
    assert sorted(finished) == sorted(ran) and sorted(j for j, _ in started) == sorted(ran)
    assert ran["d"]["start"] >= max(ran["a"]["end"], ran["b"]["end"])
    assert ran["x"]["start"] >= ran["c"]["end"] and ran["e"]["start"] >= ran["x"]["end"]
    heavy = {j: r for j, r in ran.items() if j != "f"}
    for job, r in heavy.items():                                                # at most 2 at any moment...
        assert sum(o["start"] <= r["start"] < o["end"] for o in heavy.values()) <= 2, job
    assert ran["f"]["start"] < min(ran["a"]["end"], ran["b"]["end"])           # ...and the light one beside them
    assert not [j for j, o in ran.items() if j != "x" and o["start"] < ran["x"]["end"] and ran["x"]["start"] < o["end"]]
    assert ran["x"]["share"] == 2 and ran["f"]["share"] == 1                    # alone: every worker's share
    assert [j for j, _ in started][:2] == ["a", "b"]                            # ready jobs start in `jobs` order
    assert any(len(s) == 3 for s in shown) and not any(len(s) > 3 for s in shown)


def test_a_failing_process_stops_the_run_and_the_others(tmp_path):
    from nanoseek.pipeline.scheduler import Job, JobFailed, run_jobs

    jobs = {"slow": Job(spawn=_process(tmp_path, "slow", seconds=30)),
            "bad": Job(spawn=_process(tmp_path, "bad", seconds=0.1, exitcode=3)),
            "after": Job(("bad",), spawn=_process(tmp_path, "after"))}
    t0 = time.time()
    with pytest.raises(JobFailed) as e:
        run_jobs(jobs, 2, poll=0.05)
    assert (e.value.job, e.value.exitcode) == ("bad", 3)
    assert time.time() - t0 < 25 and sorted(p.stem for p in tmp_path.glob("*.json")) == ["bad"]   # slow stopped


def test_jobs_in_this_process_run_in_order_and_raise_their_error():
    from nanoseek.pipeline.scheduler import Job, run_jobs

    order = []
    jobs = {"b": Job(("a",), run=lambda: order.append("b")), "a": Job(run=lambda: order.append("a")),
            "c": Job(run=lambda: order.append("c"))}
    run_jobs(jobs, 1)
    assert order == ["a", "b", "c"]                  # b after its need, then ahead of c: the earlier in `jobs`

    def broken():
        raise ValueError("toy job broke")

    order.clear()
    with pytest.raises(ValueError, match="toy job broke"):
        run_jobs({"a": Job(run=broken), "b": Job(("a",), run=lambda: order.append("b"))}, 1)
    assert order == []
    with pytest.raises(ValueError, match="cycle"):
        run_jobs({"a": Job(("b",), run=lambda: None), "b": Job(("a",), run=lambda: None)}, 1)
    with pytest.raises(ValueError, match="unknown"):
        run_jobs({"a": Job(("z",), run=lambda: None)}, 1)
    with pytest.raises(ValueError, match="either"):
        run_jobs({"a": Job()}, 1)


def test_jobs_fork_from_a_server_that_imported_the_preloaded_modules(tmp_path):
    """The job processes start with `preload` imported (fork server). In a fresh interpreter: a process has one
    fork server, and another user of it in this test session (the corpus workers) may have started it first."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import json; from pathlib import Path\n"
            "from test_scheduler import _process\n"
            "from nanoseek.pipeline.scheduler import Job, run_jobs\n"
            f"run_jobs({{'a': Job(spawn=_process({str(tmp_path)!r}, 'a', 0.1))}}, 1, poll=0.05, "
            "preload=('nanoseek.pipeline.scheduler',))\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert json.loads((tmp_path / "a.json").read_text())["preloaded"]
