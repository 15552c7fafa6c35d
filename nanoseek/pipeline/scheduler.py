"""A generic scheduler over a graph of jobs (`Job`, `run_jobs`), and the stage graph's vocabulary: a `Stage` (a
named job with the stages it needs), the closure of what one stage needs, and the progress line of a running
stage. `nanoseek.pipeline.stages` declares the R1 graph with it and runs it, in one process or in `workers`
spawned processes."""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Job:
    """One node of a job graph, run in this process (`run()`: the scheduler waits for it, so nothing starts beside
    it) or in a spawned process: `spawn(share)` gives the process's picklable target and its arguments, `share`
    being how many workers' resources (threads, say) the job may use — all of them when it runs alone, else 1."""
    needs: tuple[str, ...] = ()                               # jobs that must finish first
    run: Callable[[], object] | None = None
    spawn: Callable[[int], tuple[Callable, tuple]] | None = None
    exclusive: bool = False           # runs alone: it waits for the running jobs, and none start beside it
    light: bool = False               # short (seconds): does not count as company for a job that could run alone,
                                      # and one may run beside `workers` others (an evaluation need not wait)


class JobFailed(RuntimeError):
    """A spawned job exited with a nonzero code (what it printed is the caller's business: its log, say)."""

    def __init__(self, job: str, exitcode: int | None):
        super().__init__(f"{job} stopped with exit code {exitcode}")
        self.job, self.exitcode = job, exitcode


def run_jobs(jobs: dict[str, Job], workers: int, done: set[str] | None = None,
             on_start: Callable[[str, int], None] | None = None, on_done: Callable[[str, float], None] | None = None,
             show: Callable[[dict[str, float]], None] | None = None, poll: float = 0.2,
             preload: tuple[str, ...] = ()) -> None:
    """Run every job not in `done` after all its needs, up to `workers` at once and one `light` job beside them;
    among the ready jobs the earlier in `jobs` starts first, and an exclusive one that must wait holds back the
    ones after it. A job runs on its
    own (share = workers) when it is exclusive, or when no other job that is not light is running or ready.
    on_start(job, share) follows each start, on_done(job, seconds) each finish, show({job: start time}) refreshes
    the running processes' display every `poll` seconds. A failing job stops the run: a callable's exception
    propagates, a process's nonzero exit raises JobFailed; either way, and on an interrupt, the processes still
    running are terminated first."""
    done = set(done or ()) & set(jobs)
    unknown = {n for job in jobs.values() for n in job.needs} - set(jobs)
    if unknown:
        raise ValueError(f"jobs need unknown jobs: {sorted(unknown)}")
    if unclear := [name for name, job in jobs.items() if (job.run is None) == (job.spawn is None)]:
        raise ValueError(f"jobs {unclear}: give each either `run` or `spawn`")
    spawn = _processes(preload)
    running: dict[str, tuple] = {}             # job -> (process, start time)
    try:
        while len(done) < len(jobs):
            for name, (proc, t0) in list(running.items()):
                if proc.is_alive():
                    continue
                proc.join()
                del running[name]
                if proc.exitcode != 0:
                    raise JobFailed(name, proc.exitcode)
                done.add(name)
                if on_done:
                    on_done(name, time.time() - t0)
            ready = [j for j in jobs if j not in done and j not in running and set(jobs[j].needs) <= done]
            ran_here, waiting = False, False
            for name in ready:
                job = jobs[name]
                if any(jobs[r].exclusive for r in running) or (job.exclusive and running):
                    break                      # an exclusive job waits for the others, none start ahead of it
                heavy = sum(not jobs[r].light for r in running)
                if job.light:                  # beside `workers` jobs, one light job more
                    fits = len(running) < workers + 1
                else:                          # a heavy job waits behind an earlier one that waits
                    fits = not waiting and heavy < workers and len(running) < workers + 1
                if not fits:
                    waiting = waiting or not job.light
                    continue
                company = [j for j in [*running, *ready] if j != name and not jobs[j].light]
                share = workers if job.exclusive or not (job.light or company) else 1
                if job.run is not None:
                    t0 = time.time()
                    if on_start:
                        on_start(name, share)
                    job.run()
                    done.add(name)
                    if on_done:
                        on_done(name, time.time() - t0)
                    ran_here = True
                    break                      # what it finished may let an earlier job start: look again
                target, args = job.spawn(share)
                proc = spawn.Process(target=target, args=args, name=name)
                proc.start()
                running[name] = (proc, time.time())
                if on_start:
                    on_start(name, share)
                if job.exclusive:
                    break
            if not running and not ran_here and len(done) < len(jobs):
                raise ValueError(f"jobs that can never start (their needs form a cycle): "
                                 f"{sorted(set(jobs) - done)}")
            if show:
                show({name: t0 for name, (_, t0) in running.items()})
            if running:
                time.sleep(poll)
    finally:
        for proc, _ in running.values():       # failed or interrupted: stop the others
            proc.terminate()
        for proc, _ in running.values():
            proc.join(30)


def _processes(preload: tuple[str, ...]):
    """A fork server that imported `preload` once (torch and the stages: ~3-5 s a job, 20 jobs a pipeline): each
    job is a fork of it, started clean as a spawned process is (the server never touches CUDA or threads) but
    without importing again. Spawn where there is no fork server (Windows)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(list(preload))
    return ctx


@dataclass
class Stage:
    name: str                         # directory under the run: "01-pretrain"
    title: str                        # row label / progress text
    fn: str                           # Pipeline method running it: fn(stage_dir) -> outputs dict
    needs: tuple[str, ...] = ()       # stages whose outputs it reads (the scheduler runs it after them)
    rerun_on: str | None = None       # config section whose change makes a finished stage run again
    exclusive: bool = False           # runs alone on all the workers' threads (scales over cores; the rest do not)


def needed(stages: list[Stage], stop_after: str) -> list[Stage]:
    """The stage named (without its number) and every stage it needs, in the order of `stages`."""
    by_name = {st.name: st for st in stages}
    want, todo = set(), [next(st.name for st in stages if st.name.split("-", 1)[1] == stop_after)]
    while todo:
        name = todo.pop()
        if name not in want:
            want.add(name)
            todo.extend(by_name[name].needs)
    return [st for st in stages if st.name in want]


def last_step(stage_dir: Path) -> str:
    """'step N' of the newest metrics.jsonl under a stage directory ('' before the first step)."""
    files = sorted(stage_dir.glob("**/metrics.jsonl"), key=lambda f: f.stat().st_mtime)
    if not files:
        return ""
    with open(files[-1], "rb") as f:
        f.seek(max(0, f.seek(0, 2) - 4096))
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        try:
            return f"{files[-1].parent.name}: step {json.loads(line)['step']}"
        except (ValueError, KeyError):
            continue
    return ""

