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

import dataclasses
import math
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from nanoseek.errors import UserError
from nanoseek.sampling import rollout
from nanoseek.sampling.rewards import accuracy_reward, format_reward, language_consistency
from nanoseek.sampling.rollout import SamplingConfig, encode_prompt, response_text, stop_token_ids
from nanoseek.tasks import get_family


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
class PassAtKConfig:
    """How `evaluate` samples: K completions per problem with `sampling` (R1 report's evaluation settings,
    temperature 0.6 and top-p 0.95), and optionally one greedy decode."""
    samples: int = 8                # K samples per problem for pass@1 / cons@K
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.6, top_p=0.95))
    greedy: bool = True             # also decode greedily once per problem (greedy accuracy)
    template: str = "r1_zero"       # prompt format: "r1_zero" | "chat" | "plain" (nanoseek.sampling.rollout)
    batch_size: int = 64            # rows per generation batch
    seed: int = 0


def evaluate(model, tokenizer, problems: list, cfg=None, progress: bool = False, by_family: bool = False) -> dict:
    """Sample `cfg.samples` completions per problem (and one greedy), score them, return the statistics.

    cfg: a PassAtKConfig, or any object with its fields (missing ones take PassAtKConfig's defaults).
    Returns {"n_problems", "samples", "pass@1", "cons@K", "greedy", "format", "language", "length",
    "pass@k": {k: ...}, "per_problem": [...]}; each statistic is {"mean", "lo", "hi", "n"} (95% interval over
    problems). "language" is the share of chain-of-thought words in the problem's register (R1 §2.3.2).
    Sampling is seeded by cfg.seed and leaves the global RNG state untouched. progress: a rich bar.
    by_family=True: the same statistics for each task family, {family: {...}}, from ONE sampling pass over all
    problems (a decode step costs about the same for 200 rows as for 800, so families share the batches).
    """
    from rich.progress import Progress

    base = PassAtKConfig()
    get = lambda name: getattr(cfg, name, getattr(base, name))                  # noqa: E731
    K, template = get("samples"), get("template")
    if not problems:
        raise UserError("no problems to evaluate; pass --tasks NAMES or --data FILE.jsonl with at least one problem")
    if K < 1:
        raise UserError(f"samples={K}: need at least one sample per problem")
    device = next(model.parameters()).device
    sampling = get("sampling")
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
            g = rollout.generate(model, [prompts[r] for r in rows[i:i + bs]], sc, stop, tokenizer.pad_id, gen)
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
            greedy = score(rows, run(rows, dataclasses.replace(sampling, greedy=True)))
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


# ---------------------------------------------------------------- result tables

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
