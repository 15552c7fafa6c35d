"""R1 stage 1: cold start — a few thousand readable long-CoT examples, SFT from the base (R1 report §2.3.1).

R1-Zero reasons, but unreadably: languages mix, there is no summary, formatting drifts. R1 starts its RL
from a base fine-tuned on a few thousand examples in a fixed readable format instead, gathered from
few-shot prompting, from R1-Zero outputs cleaned up by people, and from direct prompting. The data is
small; what it buys is a readable starting point and a prior that RL then sharpens.

Ours, in the R1 output format `<think>` reasoning `</think>` `<answer>` answer `</answer>` under the chat
template:
- worked solutions of TRAIN-split task problems, written in the target register (`Problem.completion`);
- optionally R1-Zero's own outputs on other TRAIN prompts, kept only when correct, well-formed and in one
  language (the "readable R1-Zero outputs" of the report; `nanoseek.r1.rejection.sample_traces` filters);
- or the user's chat JSONL (`data.path`), used as is.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from nanoseek.data import load_chat_records
from nanoseek.errors import UserError
from nanoseek.files import atomic_write_json
from nanoseek.r1.rejection import DEFAULT_TASKS, TraceConfig, cached_records, default_sft_config, sft_on, teacher_traces
from nanoseek.tasks import sample_problems
from nanoseek.train.runs import SFTConfig


@dataclass
class ColdStartDataConfig:
    path: str | None = None           # a chat JSONL of long-CoT examples, used as is (then nothing is generated)
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    examples: int = 2000              # worked-solution examples (TRAIN split)
    difficulty: int | dict | None = None   # a level for all families or {family: level}; None = their default mixes
    register: str = "en"              # the language the reasoning is written in
    r1_zero: str | None = None        # an R1-Zero model: add its correct, readable outputs
    r1_zero_traces: TraceConfig = field(default_factory=lambda: TraceConfig(
        prompts=256, samples=2, template="r1_zero", per_prompt=1, seed=1))
    seed: int = 0


@dataclass
class ColdStartConfig:
    init: str | None = None           # the model to fine-tune (R1: the base)
    data: ColdStartDataConfig = field(default_factory=ColdStartDataConfig)
    epochs: float = 1.0               # SFT passes over the examples; 0 = use sft.train.steps
    sft: SFTConfig = field(default_factory=default_sft_config)


def worked_examples(tasks: list[str], n: int, seed: int, register: str = "en", difficulty: int | dict | None = None) -> list[dict]:
    """n chat examples {"prompt", "response"} from the worked solutions of TRAIN-split problems."""
    return [{"prompt": p.prompt, "response": p.completion(register), "family": p.family, "source": "worked"}
            for p in sample_problems(tasks, n, split="train", seed=seed, difficulty=difficulty)]


def build_coldstart_data(cfg: ColdStartConfig, out: Path, progress: bool = True) -> tuple[Path, dict]:
    """Write out/data.jsonl (+ stats.json); reused when already there (a resumed stage)."""
    dc = cfg.data
    if dc.path:
        n = len(load_chat_records(dc.path))           # validates every line now, not mid-training
        stats = {"user": n, "worked": 0, "r1_zero": 0}
        atomic_write_json(out / "stats.json", stats)
        return Path(dc.path), stats

    def build() -> tuple[list[dict], dict]:
        records = worked_examples(dc.tasks, dc.examples, dc.seed, dc.register, dc.difficulty)
        stats = {"worked": len(records), "r1_zero": 0}
        if dc.r1_zero:
            traces, trace_stats = teacher_traces(dc.r1_zero, dc.r1_zero_traces, cfg.sft.train.device, progress)
            for t in traces:
                t["source"] = "r1_zero"
            records += traces
            stats.update(r1_zero=len(traces), r1_zero_filter=trace_stats)
        if not records:
            raise UserError("cold start has no examples; raise data.examples or pass data.path")
        random.Random(dc.seed).shuffle(records)
        return records, stats

    return cached_records(out / "data.jsonl", out / "stats.json", build)


def coldstart(cfg: ColdStartConfig, out: str | Path, progress: bool = True) -> dict:
    """Build the cold-start data into out/ and SFT `cfg.init` on it into out/sft; returns paths and stats."""
    out = Path(out)
    if not cfg.init:
        raise UserError("coldstart needs the model to fine-tune: pass --init MODEL_DIR (R1: the base model)")
    data, stats = build_coldstart_data(cfg, out, progress)
    n = sum(v for k, v in stats.items() if k in ("user", "worked", "r1_zero"))
    final = sft_on(data, cfg.init, cfg.sft, out / "sft", cfg.epochs, n, progress)
    return {"data": str(data), "stats": stats, "final": str(final)}


def describe(stats: dict) -> str:
    if "user" in stats:
        return f"{stats['user']} user examples"
    extra = ""
    if "r1_zero_filter" in stats:
        f = stats["r1_zero_filter"]
        extra = f" + {stats['r1_zero']} readable R1-Zero outputs (of {f['sampled']} samples, {f['correct']} correct)"
    return f"{stats['worked']} worked solutions{extra}"
