"""Per-step metrics: metrics.jsonl (the record of truth), TensorBoard (for looking), a rich progress bar.

One object serves every training loop (pretrain, SFT, extension, GRPO/PPO): `log(step, metrics)` appends one
JSON line, writes each number as a TensorBoard scalar (lists become `name/i`, e.g. MaxVio per MoE layer),
and advances the bar. Resuming from step N first drops the records after N that a killed run may have
left, and TensorBoard's `purge_step` hides its stale events, so both logs read as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from nanoseek.files import append_jsonl, atomic_write_text, read_jsonl


class MetricsLogger:
    """`with MetricsLogger(run_dir, total_steps, start_step) as log: log.log(step, {...})`.

    show: metric names displayed next to the bar (the first ones present in each record).
    """

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int = 0, *, description: str = "train",
                 show: tuple[str, ...] = ("loss", "lr", "tokens_per_s"), tensorboard: bool = True,
                 progress: bool = True, console: Console | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self.show = show
        if self.path.exists():  # drop what a killed run logged past the checkpoint we resume from; from step 0
            # nothing is kept (a run killed after its step-0 evaluation logs that evaluation again)
            kept = [r for r in read_jsonl(self.path) if _is_number(r.get("step")) and r["step"] <= start_step] \
                if start_step else []
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1)
            except ImportError:  # tensorboard is optional at runtime; metrics.jsonl is the record
                self.tb = None
        self.console = console or Console(stderr=True)
        self.progress = None
        if progress:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                     console=self.console, transient=False)
            self.task = self.progress.add_task(description, total=total_steps, completed=start_step, info="")
            self.progress.start()

    def log(self, step: int, metrics: dict) -> None:
        record = {"step": step, **metrics, "time": round(time.time(), 3)}   # wall clock: time curves, stage costs
        append_jsonl(self.path, record)
        if self.tb is not None:
            for name, value in metrics.items():
                if isinstance(value, (list, tuple)):
                    for i, v in enumerate(value):
                        if _is_number(v):
                            self.tb.add_scalar(f"{name}/{i}", v, step)
                elif _is_number(value):
                    self.tb.add_scalar(name, value, step)
        if self.progress is not None:
            info = "  ".join(f"{k} {_fmt(metrics[k])}" for k in self.show if _is_number(metrics.get(k)))
            self.progress.update(self.task, completed=step, info=info)

    def print(self, *args) -> None:
        (self.progress.console if self.progress is not None else self.console).print(*args)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:,.0f}"
