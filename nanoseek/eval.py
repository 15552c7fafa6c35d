"""Evaluation as the R1 report does it: pass@1 over k samples, cons@k, greedy accuracy, with intervals.

A single greedy answer per problem is a noisy estimate of a sampling policy's skill, so R1 reports pass@1
as the mean correctness of k samples per problem (temperature 0.6, top-p 0.95) and cons@k as the accuracy
of the majority-voted answer. A number without its uncertainty misleads on the few hundred problems we
evaluate on, so every figure comes with a 95% confidence interval over problems:
- quantities averaged per problem (pass@1, format rate, mean length): Student-t interval of the
  per-problem means, mean ± t_{0.975, n-1} · s / √n (rates clipped to [0, 1]);
- per-problem 0/1 outcomes (greedy accuracy, cons@k): Wilson score interval, which stays inside [0, 1]
  and behaves at 0% and 100%.
The unbiased pass@k estimator of Chen et al. 2021 (eq. 1) is reported for k ∈ {1, K}.

`evaluate(model, tokenizer, problems, cfg)` is the function API (the GRPO trainer and the pipeline call
it); `nanoseek eval` wraps it with a checkpoint, a task list or a JSONL file, a rich table and JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from nanoseek.errors import UserError
from nanoseek.recipe import Range, validate


# ---------------------------------------------------------------- statistics (pure functions)

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021).

    Computed as 1 - Π_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def t_quantile(p: float, df: int) -> float:
    """Quantile of Student's t with `df` degrees of freedom (p in (0.5, 1)), by bisection on its CDF.

    CDF(t) - 1/2 = ∫_0^t f(x) dx with f the t density, integrated with Simpson's rule; accurate to ~1e-7,
    enough for a confidence interval, and it keeps scipy out of the dependencies.
    """
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf_minus_half(t: float) -> float:
        x = np.linspace(0.0, t, 4001)
        f = np.exp(log_c - (df + 1) / 2 * np.log1p(x * x / df))
        return (t / 12000) * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 1.0
    while cdf_minus_half(hi) < p - 0.5:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf_minus_half(mid) < p - 0.5 else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values, level: float = 0.95, bounds: tuple[float, float] | None = None) -> dict:
    """Mean of per-problem values with a Student-t interval: {"mean", "lo", "hi", "n"}; `bounds` clips the
    interval to the values' range (e.g. (0, 1) for rates, where the t interval can cross 0 or 1)."""
    x = np.asarray(list(values), dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "lo": float("nan"), "hi": float("nan"), "n": 1}
    half = t_quantile(0.5 + level / 2, n - 1) * float(x.std(ddof=1)) / math.sqrt(n)
    lo, hi = mean - half, mean + half
    if bounds is not None:
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    return {"mean": mean, "lo": lo, "hi": hi, "n": n}


def wilson_ci(successes: int, n: int, level: float = 0.95) -> dict:
    """Proportion with the Wilson score interval: {"mean", "lo", "hi", "n"}."""
    if n == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo = 0.0 if successes == 0 else center - half       # exact at the edges (rounding leaves ~1e-17)
    hi = 1.0 if successes == n else center + half
    return {"mean": p, "lo": lo, "hi": hi, "n": n}


def majority_vote(answers: list[str | None]) -> int | None:
    """Index of a sample carrying the most frequent extracted answer (ties: the answer seen first);
    None when no sample has an answer. Answers are compared after whitespace stripping."""
    keys = [a.strip() if a is not None else None for a in answers]
    counts = Counter(k for k in keys if k)
    if not counts:
        return None
    best = max(counts.values())
    winner = next(k for k in keys if k and counts[k] == best)
    return keys.index(winner)


# ---------------------------------------------------------------- evaluating a model

@dataclass
class EvalConfig:
    samples: int = 8                # K samples per problem for pass@1 / cons@K
    temperature: float = 0.6        # R1 report's evaluation sampling
    top_p: float = 0.95
    max_new_tokens: int = 96
    greedy: bool = True             # also decode greedily once per problem (greedy accuracy)
    template: str = "r1_zero"       # prompt format: "r1_zero" | "chat" | "plain" (nanoseek.rl.rollout)
    batch_size: int = 64            # rows per generation batch
    seed: int = 0
    CHECKS: ClassVar[dict] = {"samples": Range(1), "temperature": Range(0), "top_p": Range(0, 1),
                              "max_new_tokens": Range(1), "batch_size": Range(1)}


def evaluate(model, tokenizer, problems: list, cfg=None, progress: bool = False, by_family: bool = False) -> dict:
    """Sample `cfg.samples` completions per problem (and one greedy), score them, return the statistics.

    cfg: an EvalConfig, or any object with its fields (missing ones take EvalConfig's defaults).
    Returns {"n_problems", "samples", "pass@1", "cons@K", "greedy", "format", "language", "length",
    "pass@k": {k: ...}, "per_problem": [...]}; each statistic is {"mean", "lo", "hi", "n"} (95% interval over
    problems). "language" is the share of chain-of-thought words in the problem's register (R1 §2.3.2).
    Sampling is seeded by cfg.seed and leaves the global RNG state untouched. progress: a rich bar.
    by_family=True: the same statistics for each task family, {family: {...}}, from ONE sampling pass over all
    problems (a decode step costs about the same for 200 rows as for 800, so families share the batches).
    """
    from rich.progress import Progress

    from nanoseek.rl.rewards import accuracy_reward, format_reward, language_consistency
    from nanoseek.rl.rollout import SamplingConfig, encode_prompt, generate, response_text, stop_token_ids
    from nanoseek.tasks import get_family

    base = EvalConfig()
    get = lambda name: getattr(cfg, name, getattr(base, name))                  # noqa: E731
    K, template = get("samples"), get("template")
    if not problems:
        raise UserError("no problems to evaluate; pass --tasks NAMES or --data FILE.jsonl with at least one problem")
    if K < 1:
        raise UserError(f"samples={K}: need at least one sample per problem")
    device = next(model.parameters()).device
    sampling = SamplingConfig(max_new_tokens=get("max_new_tokens"), temperature=get("temperature"), top_p=get("top_p"))
    stop = stop_token_ids(tokenizer, sampling.stop)
    prompts = [encode_prompt(tokenizer, p.prompt, template) for p in problems]
    gen = torch.Generator(device=device).manual_seed(get("seed"))
    was_training = model.training
    model.eval()
    t0, n_tokens = time.perf_counter(), 0

    bs = get("batch_size")
    n_rows = len(problems) * (K + bool(get("greedy")))
    bar = Progress(*Progress.get_default_columns(), transient=True, disable=not progress)

    def run(rows: list[int], sc: SamplingConfig) -> list[list[int]]:
        nonlocal n_tokens
        out: list[list[int]] = []
        for i in range(0, len(rows), bs):
            g = generate(model, [prompts[r] for r in rows[i:i + bs]], sc, stop, tokenizer.pad_id, gen)
            out += g.completions()
            n_tokens += int(g.lengths.sum())
            bar.update(task, advance=len(g.finish))
        return out

    def score(rows: list[int], completions: list[list[int]]) -> list[dict]:
        out = []
        for r, c in zip(rows, completions):
            text = response_text(tokenizer, c, template)
            p = problems[r]
            out.append({"correct": accuracy_reward(p, text) >= 1.0, "format": format_reward(text) >= 1.0,
                        "language": language_consistency(text, p.meta.get("register", "en")),
                        "length": len(c), "answer": get_family(p.family).extract_answer(text)})
        return out

    with bar:
        task = bar.add_task(f"eval: {len(problems)} problems x {K} samples", total=n_rows)
        sample_rows = [r for r in range(len(problems)) for _ in range(K)]
        samples = score(sample_rows, run(sample_rows, sampling))
        greedy = None
        if get("greedy"):
            rows = list(range(len(problems)))
            greedy = score(rows, run(rows, SamplingConfig(max_new_tokens=sampling.max_new_tokens, greedy=True)))
    model.train(was_training)

    per_problem = []
    for i, p in enumerate(problems):
        s = samples[i * K:(i + 1) * K]
        c = sum(x["correct"] for x in s)
        vote = majority_vote([x["answer"] for x in s])
        per_problem.append({
            "prompt": p.prompt, "answer": p.answer, "correct": c,
            "format": sum(x["format"] for x in s) / K, "language": sum(x["language"] for x in s) / K,
            "length": sum(x["length"] for x in s) / K,
            "voted": s[vote]["answer"] if vote is not None else None,
            "cons": vote is not None and s[vote]["correct"],
            **({"greedy": greedy[i]["correct"]} if greedy else {}),
        })
    rate = n_tokens / max(time.perf_counter() - t0, 1e-9)
    if by_family:
        return {f: _summary([q for q, p in zip(per_problem, problems) if p.family == f], K, bool(greedy), rate)
                for f in dict.fromkeys(p.family for p in problems)}
    return _summary(per_problem, K, bool(greedy), rate)


def _summary(per_problem: list[dict], K: int, greedy: bool, tokens_per_s: float) -> dict:
    """evaluate()'s statistics over `per_problem` records: means with 95% intervals over problems."""
    n = len(per_problem)
    result = {
        "n_problems": n, "samples": K,
        "pass@1": mean_ci((q["correct"] / K for q in per_problem), bounds=(0, 1)),
        f"cons@{K}": wilson_ci(sum(q["cons"] for q in per_problem), n),
        "format": mean_ci((q["format"] for q in per_problem), bounds=(0, 1)),
        "language": mean_ci((q["language"] for q in per_problem), bounds=(0, 1)),
        "length": mean_ci(q["length"] for q in per_problem),
        "pass@k": {str(k): mean_ci((pass_at_k(K, q["correct"], k) for q in per_problem), bounds=(0, 1))
                   for k in sorted({1, K})},
    }
    if greedy:
        result["greedy"] = wilson_ci(sum(q["greedy"] for q in per_problem), n)
    result["generated_tokens_per_s"] = tokens_per_s
    result["per_problem"] = per_problem
    return result


# ---------------------------------------------------------------- loading, tables, `nanoseek eval`

def find_tokenizer(path: str | Path) -> Path:
    """The tokenizer of a checkpoint: in the directory itself, else in a `tokenizer/` folder of it or of
    one of its two parents (a run directory keeps one tokenizer for all of `checkpoints/step-N`)."""
    path = Path(path)
    for d in (path, path.parent, path.parent.parent):
        for cand in (d, d / "tokenizer"):
            if (cand / "tokenizer.json").is_file():
                return cand
    raise UserError(f"no tokenizer.json in {path}, its parents or their tokenizer/ folders; copy the "
                    f"tokenizer next to the checkpoint (nanoseek tokenizer --out {path})")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", inference: bool = False):
    """(model in eval mode, tokenizer) from an HF-format directory nanoseek can load. inference=True (models
    that only generate): bf16 weights on CUDA, as R1 is served, so decoding runs CUDA graphs with the
    grouped expert kernel; fp32 sampling there would sync with the host for every expert of every token."""
    from nanoseek.hf import load_pretrained
    from nanoseek.tokenizer import Tokenizer, check_vocab_fits

    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} is not a directory; pass a model directory such as RUN/checkpoints/step-N")
    tokenizer = Tokenizer.load(find_tokenizer(path))
    model = load_pretrained(path, device=str(device)).eval()
    if inference and next(model.parameters()).is_cuda:
        model = model.to(torch.bfloat16)
    check_vocab_fits(len(tokenizer), model.config.vocab_size)
    return model, tokenizer


def _cell(stat: dict, percent: bool) -> str:
    if percent:
        return f"{100 * stat['mean']:.1f} [{100 * stat['lo']:.1f}, {100 * stat['hi']:.1f}]"
    return f"{stat['mean']:.1f} [{stat['lo']:.1f}, {stat['hi']:.1f}]"


def summary_rows(result: dict) -> list[tuple[str, str, str]]:
    """(metric, mean [95% CI], interval kind) for the table and the markdown report."""
    K = result["samples"]
    rows = [(f"pass@1 (mean of {K} samples), %", _cell(result["pass@1"], True), "t"),
            (f"cons@{K} (majority vote), %", _cell(result[f"cons@{K}"], True), "Wilson")]
    if "greedy" in result:
        rows.append(("greedy accuracy, %", _cell(result["greedy"], True), "Wilson"))
    if K > 1:
        rows.append((f"pass@{K} (unbiased), %", _cell(result["pass@k"][str(K)], True), "t"))
    rows += [("format rate, %", _cell(result["format"], True), "t"),
             ("language consistency, %", _cell(result["language"], True), "t"),
             ("mean length, tokens", _cell(result["length"], False), "t")]
    return rows


def markdown_table(result: dict) -> str:
    lines = [f"| metric ({result['n_problems']} problems) | mean [95% CI] | interval |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(result)]
    return "\n".join(lines) + "\n"


def load_problems(tasks: list[str] | None, data: str | None, n: int, seed: int, difficulty: int | None = None) -> list:
    """Held-out problems: the TEST split of task families, or a user JSONL file (first n)."""
    if bool(tasks) == bool(data):
        raise UserError("pass exactly one of --tasks NAMES or --data FILE.jsonl")
    if data:
        from nanoseek.tasks.jsonl import load_jsonl_problems
        problems = load_jsonl_problems(data)
        return problems[:n] if n else problems
    from nanoseek.tasks import sample_problems
    return sample_problems(tasks, n, split="test", seed=seed, difficulty=difficulty)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="model directory (HF format) with a tokenizer")
    parser.add_argument("--tasks", default=None, help="comma-separated task families, e.g. arithmetic,countdown")
    parser.add_argument("--data", default=None, help="JSONL file with question/prompt and answer (GSM8K, MATH)")
    parser.add_argument("--samples", type=int, default=8, help="samples per problem K (default 8)")
    parser.add_argument("--n-problems", type=int, default=100, help="problems to evaluate (0 = all of --data)")
    parser.add_argument("--json", default=None, help="write the full result (per-problem records too) here")
    parser.add_argument("--template", default="r1_zero", choices=["r1_zero", "chat", "plain"])
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--difficulty", type=int, default=None, help="task difficulty (default: the family's mix)")
    parser.add_argument("--no-greedy", action="store_true", help="skip the greedy decode")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markdown import Markdown

    from nanoseek.files import atomic_write_json, check_output_file

    if args.samples < 1 or args.n_problems < 0:
        raise UserError("--samples must be >= 1 and --n-problems >= 0")
    if args.json:
        check_output_file(args.json, "--json")      # before the evaluation, so its result cannot be lost
    tasks = [t for t in (args.tasks or "").replace(" ", ",").split(",") if t]
    problems = load_problems(tasks, args.data, args.n_problems, args.seed, args.difficulty)
    from nanoseek.train.trainer import resolve_device

    model, tokenizer = load_checkpoint(args.checkpoint, resolve_device(args.device), inference=True)
    cfg = EvalConfig(samples=args.samples, temperature=args.temperature, top_p=args.top_p,
                     max_new_tokens=args.max_new_tokens, greedy=not args.no_greedy, template=args.template,
                     batch_size=args.batch_size, seed=args.seed)
    validate(cfg, "eval")
    console = Console()
    result = evaluate(model, tokenizer, problems, cfg, progress=True)
    result["checkpoint"] = str(args.checkpoint)
    result["config"] = dataclasses.asdict(cfg)
    console.print(f"{args.checkpoint}: {len(problems)} problems, {args.samples} samples each")
    console.print(Markdown(markdown_table(result)))
    if args.json:
        atomic_write_json(args.json, result)
        console.print(f"written {args.json}")
    return 0
