"""R1 stage 3: rejection sampling into an SFT data set, then SFT from the BASE (R1 report §2.3.3).

When reasoning RL has converged, R1 samples its checkpoint many times per prompt and keeps only what it
would want to teach: correct answers (rule-checked), well-formed output, one language, no duplicates —
600K reasoning samples — and mixes in 200K non-reasoning samples (writing, factual QA, self-cognition),
then fine-tunes the BASE model on the 800K for 2 epochs. Fine-tuning from the base rather than the RL
model is the point: the data now carries what RL found, in a readable form, and the next RL stage starts
from a clean SFT model.

At our scale: a few hundred prompts × K samples, the general share at R1's 1 : 3 (general : reasoning), and
`epochs` SFT passes over the mix. When the sampled model solves too few prompts (a few-minute CPU model
does), `traces.min_kept` tops the data up with the worked solutions of unsolved prompts; the stats, and the
pipeline's report, say how many of each.

`sample_traces` is also what distillation uses for the teacher's correct traces (nanoseek.distill) and
what cold start uses for readable R1-Zero outputs (nanoseek.r1.coldstart).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from nanoseek.errors import UserError
from nanoseek.files import atomic_write_json, atomic_write_text
from nanoseek.hf import load_checkpoint
from nanoseek.r1.general import general_records
from nanoseek.run import resolve_device
from nanoseek.sampling import rollout
from nanoseek.sampling.rewards import RewardConfig, compute_rewards
from nanoseek.sampling.rollout import SamplingConfig, encode_prompt, response_text, stop_conditions
from nanoseek.tasks.problems import load_problems
from nanoseek.train.optim import OptimConfig
from nanoseek.train.runs import SFTConfig, SFTDataConfig, sft
from nanoseek.train.trainer import TrainEvalConfig, TrainConfig

DEFAULT_TASKS = ["arithmetic", "countdown", "linear"]


@dataclass
class TraceConfig:
    """Which problems to sample, how, and what to keep."""
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    difficulty: int | dict | None = None   # a level for all families or {family: level}; None = their default mixes
    data: str = ""                    # a JSONL of problems (GSM8K / MATH / question-answer) instead of tasks
    prompts: int = 384                # TRAIN-split problems to sample
    samples: int = 4                  # K completions per prompt
    template: str = "chat"            # prompt format of the sampled model: "chat" (R1 stages) | "r1_zero"
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=128, temperature=0.7,
                                                                            top_p=0.95))
    batch_size: int = 128             # rows per generation batch
    min_language: float = 1.0         # keep reasoning whose target-register share is at least this
    per_prompt: int = 2               # distinct kept responses per prompt at most (de-duplicated)
    min_kept: int = 0                 # top up to this many with worked solutions of prompts nothing passed for
    seed: int = 0


def teacher_traces(model_dir: str | Path, tc: TraceConfig, device: str, progress: bool = True) -> tuple[list[dict], dict]:
    """Load the model at `model_dir` and sample its kept traces (`sample_traces`) on the TRAIN-split task
    problems of `tc`, or on the first `tc.prompts` problems of the user's JSONL file `tc.data`."""
    model, tok = load_checkpoint(model_dir, resolve_device(device), inference=True)
    problems = load_problems(tc.tasks, tc.data, tc.prompts, "train", tc.seed, tc.difficulty)
    return sample_traces(model, tok, problems, tc, progress)


@torch.no_grad()
def sample_traces(model, tok, problems: list, tc: TraceConfig, progress: bool = True) -> tuple[list[dict], dict]:
    """Sample K completions per problem; keep correct, well-formed, one-language, distinct ones.

    Returns (records, stats): records are {"prompt", "response", "family", "answer"} chat examples whose
    response is in the R1 format (`<think>…</think> <answer>…</answer>`); stats count every filter.
    """
    from rich.progress import Progress

    if tc.samples < 1 or tc.batch_size < 1:
        raise UserError("traces.samples and traces.batch_size must be >= 1")
    device = next(model.parameters()).device
    sampling = tc.sampling
    stop = stop_conditions(tok, sampling.stop)
    gen = torch.Generator(device=device).manual_seed(tc.seed)
    rows = [i for i in range(len(problems)) for _ in range(tc.samples)]
    prompts = [encode_prompt(tok, p.prompt, tc.template) for p in problems]
    rewards = RewardConfig()
    stats = {"prompts": len(problems), "sampled": 0, "correct": 0, "formatted": 0, "one_language": 0,
             "duplicates": 0, "kept": 0, "prompts_with_kept": 0}
    kept: dict[int, dict[str, dict]] = {}
    was_training = model.training
    model.eval()
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task("rejection sampling", total=len(rows))
        for start in range(0, len(rows), tc.batch_size):
            chunk = rows[start:start + tc.batch_size]
            g = rollout.generate(model, [prompts[i] for i in chunk], sampling, stop, tok.pad_id, gen)
            for i, c in zip(chunk, g.completions()):
                text = response_text(tok, c, tc.template).strip()
                r = compute_rewards(rewards, problems[i], text, len(c))
                stats["sampled"] += 1
                ok_acc, ok_fmt = r["accuracy"] >= 1.0, r["format"] >= 1.0
                ok_lang = r["language"] >= tc.min_language
                stats["correct"] += ok_acc
                stats["formatted"] += ok_acc and ok_fmt
                stats["one_language"] += ok_acc and ok_fmt and ok_lang
                if not (ok_acc and ok_fmt and ok_lang):
                    continue
                seen = kept.setdefault(i, {})
                key = " ".join(text.split())
                if key in seen or len(seen) >= tc.per_prompt:
                    stats["duplicates"] += key in seen
                    continue
                seen[key] = {"prompt": problems[i].prompt, "response": text, "family": problems[i].family,
                             "answer": problems[i].answer}
            bar.update(task, advance=len(chunk))
    model.train(was_training)
    records = [r for i in sorted(kept) for r in kept[i].values()]
    stats["kept"] = len(records)
    stats["prompts_with_kept"] = sum(bool(v) for v in kept.values())
    missing = [p for i, p in enumerate(problems) if not kept.get(i)][:max(0, tc.min_kept - len(records))]
    records += [{"prompt": p.prompt, "response": p.completion(), "family": p.family, "answer": p.answer,
                 "source": "worked"} for p in missing]
    stats["worked_fallback"] = len(missing)
    return records, stats


def write_records(path: str | Path, records: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def cached_records(path: Path, stats_path: Path, build: Callable[[], tuple[list[dict], dict]]) -> tuple[Path, dict]:
    """(path, stats) of a stage's records: reused when both files exist (a resumed stage samples nothing),
    else `build()` -> (records, stats), written atomically, records first, so the stats file marks them done."""
    if path.is_file() and stats_path.is_file():
        return path, json.loads(stats_path.read_text())
    records, stats = build()
    write_records(path, records)
    atomic_write_json(stats_path, stats)
    return path, stats


def sft_steps(n_examples: int, batch_size: int, epochs: float) -> int:
    """Optimizer steps for `epochs` passes over `n_examples` at `batch_size` (at least 1)."""
    return max(1, math.ceil(epochs * n_examples / batch_size))


def sft_on(records_path: Path, init: str, sft_cfg: SFTConfig, out: Path, epochs: float, n_examples: int,
           progress: bool) -> Path:
    """SFT `init` on a chat JSONL for `epochs` passes (epochs 0 = sft.train.steps as given); returns final/."""
    train = sft_cfg.train
    if epochs > 0:
        train = dataclasses.replace(train, steps=sft_steps(n_examples, train.batch_size, epochs))
    cfg = dataclasses.replace(sft_cfg, init=str(init), train=train,
                              data=dataclasses.replace(sft_cfg.data, path=str(records_path)))
    return sft(cfg, out, resume=True, progress=progress)


# ---------------------------------------------------------------- the stage

def default_sft_config() -> SFTConfig:
    return SFTConfig(optim=OptimConfig(lr=1e-3, warmup_steps=10), train=TrainConfig(steps=100, mtp_lambda=0.1),
                     eval=TrainEvalConfig(every=0, problems=0, template="chat"), data=SFTDataConfig(val_examples=32))


@dataclass
class RejectionConfig:
    init: str | None = None           # the model to sample (R1: the stage-2 reasoning-RL checkpoint)
    base: str | None = None           # the model to fine-tune on the result (R1: the base); None = data only
    traces: TraceConfig = field(default_factory=TraceConfig)
    general_ratio: float | None = None  # general examples per kept reasoning example (R1: 200K / 600K = 1/3);
                                      # None = 1/3 on task problems, 0 on the user's traces.data (nanoseek's canned
                                      # general examples are not the user's; set a ratio to mix them in anyway)
    epochs: float = 2.0               # SFT passes over the mix (R1: 2); 0 = use sft.train.steps
    sft: SFTConfig = field(default_factory=default_sft_config)


def build_rejection_data(cfg: RejectionConfig, out: Path, progress: bool = True) -> tuple[Path, dict]:
    """Sample, filter and mix into out/data.jsonl (+ out/stats.json); reused when already there."""
    def build() -> tuple[list[dict], dict]:
        if not cfg.init:
            raise UserError("rejection needs the model to sample: pass --init MODEL_DIR (e.g. a reasoning-RL run's final/)")
        records, stats = teacher_traces(cfg.init, cfg.traces, cfg.sft.train.device, progress)
        if not records:
            raise UserError(f"rejection sampling kept none of {stats['sampled']} samples ({stats['correct']} correct); "
                            "sample more (traces.prompts, traces.samples) or train the model further")
        ratio = cfg.general_ratio if cfg.general_ratio is not None else (0.0 if cfg.traces.data else 1 / 3)
        if ratio < 0:
            raise UserError(f"general_ratio={ratio} must be >= 0")
        general = general_records(round(ratio * len(records)), seed=cfg.traces.seed)
        stats.update(reasoning=len(records), general=len(general))
        mixed = records + general
        random.Random(cfg.traces.seed).shuffle(mixed)
        return mixed, stats

    return cached_records(out / "data.jsonl", out / "stats.json", build)


def rejection(cfg: RejectionConfig, out: str | Path, progress: bool = True) -> dict:
    """The whole stage: data into out/, then (with cfg.base) SFT from the base into out/sft."""
    out = Path(out)
    data, stats = build_rejection_data(cfg, out, progress)
    result = {"data": str(data), "stats": stats}
    if cfg.base:
        n = stats["reasoning"] + stats["general"]
        result["final"] = str(sft_on(data, cfg.base, cfg.sft, out / "sft", cfg.epochs, n, progress))
    return result


def describe(stats: dict) -> str:
    s = stats
    return (f"{s['sampled']} samples of {s['prompts']} prompts: {s['correct']} correct, {s['formatted']} also well-formed, "
            f"{s['one_language']} also one-language, {s['duplicates']} duplicates dropped -> {s['kept']} kept "
            f"({s['prompts_with_kept']} prompts)"
            + (f", topped up with {s['worked_fallback']} worked solutions" if s.get("worked_fallback") else "")
            + (f" + {s['general']} general" if "general" in s else ""))
