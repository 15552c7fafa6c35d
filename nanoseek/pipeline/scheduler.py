"""The stage graph's vocabulary: a `Stage` (a named job with the stages it needs), the closure of what one stage
needs, and the progress line of a running stage. `nanoseek.pipeline.stages` declares the R1 graph with it and
runs it, in one process or in `workers` spawned processes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


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

