"""Evaluation as the R1 report does it: pass@1 over k samples, cons@k, greedy accuracy, with intervals.

A single greedy answer per problem is a noisy estimate of a sampling policy's skill, so R1 reports pass@1
as the mean correctness of k samples per problem (temperature 0.6, top-p 0.95) and cons@k as the accuracy
of the majority-voted answer. A number without its uncertainty misleads on the few hundred problems we
evaluate on, so every figure comes with a 95% confidence interval over problems:
- rates from K samples per problem (pass@1, format rate, language consistency, reflection): `rate_ci`, a
  Wilson score interval on the design's effective sample size. The K samples of one problem are correlated
  (a problem is easy or hard), so n problems × K samples carry less than nK independent draws: n_eff = nK / deff
  with the design effect deff = (variance of the per-problem rates / n) / (binomial variance p(1-p)/(nK)),
  clipped to [1, K]. deff is estimated with a fifth of a pseudo-problem at rate 1 and a fifth at rate 0
  added (PSEUDO_PROBLEMS): with few successes the observed spread says little about how concentrated they
  are, and without it a single success would claim deff ≈ 1 and cover 1% rates only 86-92% of the time.
  Coverage is tested by simulation (tests/test_eval.py): 94-97.5% at 1%, 5%, 20% and 50% for 30-100
  problems × 4-8 samples with Beta-distributed per-problem rates; for problems that are all alike it is
  conservative (up to ~99% at 1-5%). All-zero data give [0, z²/(n + z²)], never [0, 0]. It replaced a
  Student-t interval over per-problem means, which covered 0.47-0.83 at 1% and 0.85-0.92 at 5% in those
  designs, and gave [0, 0] for all-zero data.
- per-problem 0/1 outcomes (greedy accuracy, cons@k, pass@K): the Wilson score interval over problems
  (the same interval with K = 1).
- mean length: Student-t interval of the per-problem means (`mean_ci`).
The unbiased pass@k estimator of Chen et al. 2021 (eq. 1) is reported for k ∈ {1, K}.

`evaluate(model, tokenizer, problems, cfg)` is the function API (the GRPO trainer and the pipeline call
it); `nanoseek eval` wraps it with a checkpoint, a task list or a JSONL file, a rich table and JSON.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from nanoseek.errors import UserError
from nanoseek.recipe import Range
from nanoseek.sampling import rollout
from nanoseek.sampling.reflection import reflects
from nanoseek.sampling.rewards import RewardConfig, accuracy_reward, format_reward, language_consistency
from nanoseek.sampling.rollout import SamplingConfig, encode_prompt, response_text, stop_conditions
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
    p = successes / n
    lo, hi = _wilson(np.float64(p), n, level)
    return {"mean": p, "lo": float(lo), "hi": float(hi), "n": n}


PSEUDO_PROBLEMS = 0.2  # weight of each of the two pseudo-problems (rate 0, rate 1) in the design effect


def rate_interval(rates: np.ndarray, samples: int, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) of the mean of per-problem rates, vectorised: rates [..., n] -> lo, hi [...].

    Wilson on n_eff = nK / deff (module doc). deff = s²_w / (p_w (1 - p_w) / K) is computed on the rates
    with the two weighted pseudo-problems added (p_w, s²_w: their weighted mean and variance); the interval
    itself is centred on the plain mean of the n real problems.
    """
    x = np.asarray(rates, dtype=np.float64)
    n, w, K = x.shape[-1], PSEUDO_PROBLEMS, max(int(samples), 1)
    p = x.mean(-1)
    p_w = (x.sum(-1) + w) / (n + 2 * w)
    ss_w = ((x - p_w[..., None]) ** 2).sum(-1) + w * (p_w ** 2 + (1 - p_w) ** 2)
    deff = np.clip(ss_w / (n + 2 * w - 1) / (p_w * (1 - p_w) / K), 1.0, K)
    return _wilson(p, n * K / deff, level)


def _wilson(p, n, level: float):
    """Wilson score interval of a proportion p from n (possibly fractional) trials, elementwise."""
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return np.where(p <= 0, 0.0, center - half), np.where(p >= 1, 1.0, center + half)   # exact at the edges


def rate_ci(values, samples: int, level: float = 0.95) -> dict:
    """Mean of per-problem rates, each from `samples` samples, with `rate_interval`: {"mean", "lo", "hi", "n"}."""
    x = np.asarray(list(values), dtype=np.float64)
    if len(x) == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    lo, hi = rate_interval(x, samples, level)
    return {"mean": float(x.mean()), "lo": float(lo), "hi": float(hi), "n": len(x)}


def majority_vote(answers: list[str | None], same=None) -> int | None:
    """Index of the sample that represents the largest group of equivalent answers; None when no sample has
    an answer. same(a, b) -> bool is the equivalence (the task family's verifier, `TaskFamily.same_answer`:
    "1,000" = "1000", "3 + 4" = "4 + 3" on Countdown); default: equal after whitespace stripping.

    Groups form in sampling order: each answer joins the first group whose first member it equals, else
    starts a new one. Tie rule: among the largest groups, the one whose first member was sampled earliest;
    the returned index is that first member.
    """
    same = same or (lambda a, b: a.strip() == b.strip())
    groups: list[list[int]] = []
    for i, a in enumerate(answers):
        if a is None or not a.strip():
            continue
        for g in groups:
            if same(answers[g[0]], a):
                g.append(i)
                break
        else:
            groups.append([i])
    if not groups:
        return None
    return max(groups, key=len)[0]      # max keeps the first of equal-sized groups: the earliest-sampled


def completion_records(result: dict, n: int = 3) -> list[dict]:
    """A few judged completions of an evaluate() result, for a run's log (as TRL's log_completions): the
    first recorded completion of each of the first n problems, with its extracted answer and verdict."""
    out = []
    for q in result["per_problem"][:n]:
        if q.get("completions"):
            c = q["completions"][0]
            out.append({"prompt": q["prompt"], "gold": q["answer"], **c})
    return out


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
    record_completions: int = 2     # sampled completions kept per problem in the result (what was judged)
    CHECKS: ClassVar[dict] = {"samples": Range(1), "batch_size": Range(1)}


def evaluate(model, tokenizer, problems: list, cfg=None, progress: bool = False, by_family: bool = False,
             rewards=None, system_prompt: str = "") -> dict:
    """Sample `cfg.samples` completions per problem (and one greedy), score them, return the statistics.

    Accuracy is judged as the reward is (nanoseek.sampling.rewards): on the final answer in `rewards.answer_format`
    (a RewardConfig; default: <answer> tags), no last-number fallback unless `rewards.answer_fallback`.
    "pass@1_lenient" beside it scores every sample with the fallback. Each per-problem record holds the
    extracted "answers" of all K samples and the first `cfg.record_completions` completions with their
    verdicts, so a reader can check a judgement.

    cfg: a PassAtKConfig, or any object with its fields (missing ones take PassAtKConfig's defaults).
    Returns {"n_problems", "samples", "pass@1", "cons@K", "greedy", "format", "language", "reflection",
    "length", "pass@k": {k: ...}, "per_problem": [...]}; each statistic is {"mean", "lo", "hi", "n"} (95% interval
    over problems). "language" is the share of chain-of-thought words in the problem's register (R1 §2.3.2);
    "reflection" the share of samples whose reasoning checks or redoes a step (nanoseek.sampling.reflection).
    Sampling is seeded by cfg.seed and leaves the global RNG state untouched. progress: a rich bar.
    system_prompt: a system turn before each question (chat template only; the RL trainer passes tasks.system_prompt).
    by_family=True: the same statistics for each task family, {family: {...}}, from ONE sampling pass over all
    problems (a decode step costs about the same for 200 rows as for 800, so families share the batches).
    """
    from rich.progress import Progress

    base = PassAtKConfig()
    get = lambda name: getattr(cfg, name, getattr(base, name))                  # noqa: E731
    K, template = get("samples"), get("template")
    rewards = rewards or RewardConfig()
    fmt, fallback = rewards.answer_format, rewards.answer_fallback
    if not problems:
        raise UserError("no problems to evaluate; pass --tasks NAMES or --data FILE.jsonl with at least one problem")
    if K < 1:
        raise UserError(f"samples={K}: need at least one sample per problem")
    device = next(model.parameters()).device
    sampling = get("sampling")
    stop = stop_conditions(tokenizer, sampling.stop)
    prompts = [encode_prompt(tokenizer, p.prompt, template, system_prompt) for p in problems]
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
            answer = get_family(p.family).extract_answer(text, fmt, fallback)
            correct = accuracy_reward(p, text, fmt, fallback) >= 1.0
            # lenient (fallback) differs only where the required format holds no answer: score those again
            lenient = correct if answer is not None else accuracy_reward(p, text, fmt, True) >= 1.0
            out.append({"correct": correct, "lenient": lenient, "format": format_reward(text) >= 1.0,
                        "language": language_consistency(text, p.meta.get("register", "en")),
                        "reflection": reflects(text), "length": len(c), "answer": answer, "text": text})
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
        family = get_family(p.family)
        vote = majority_vote([x["answer"] for x in s], lambda a, b, p=p, f=family: f.same_answer(p, a, b))
        per_problem.append({
            "prompt": p.prompt, "answer": p.answer, "correct": c, "correct_lenient": sum(x["lenient"] for x in s),
            "answers": [x["answer"] for x in s],
            "completions": [{"completion": x["text"], "answer": x["answer"], "correct": x["correct"]}
                            for x in s[:get("record_completions")]],
            "format": sum(x["format"] for x in s) / K, "language": sum(x["language"] for x in s) / K,
            "reflection": sum(x["reflection"] for x in s) / K,
            "length": sum(x["length"] for x in s) / K,
            "voted": s[vote]["answer"] if vote is not None else None,
            "cons": vote is not None and s[vote]["correct"],
            **({"greedy": greedy[i]["correct"], "greedy_answer": greedy[i]["answer"]} if greedy else {}),
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
        "pass@1": rate_ci((q["correct"] / K for q in per_problem), K),
        "pass@1_lenient": rate_ci((q["correct_lenient"] / K for q in per_problem), K),
        f"cons@{K}": wilson_ci(sum(q["cons"] for q in per_problem), n),
        "format": rate_ci((q["format"] for q in per_problem), K),
        "language": rate_ci((q["language"] for q in per_problem), K),
        "length": mean_ci(q["length"] for q in per_problem),
        # pass@1 is a rate of K samples per problem; pass@K is one 0/1 outcome per problem (Wilson over problems)
        "pass@k": {str(k): rate_ci((pass_at_k(K, q["correct"], k) for q in per_problem), K if k == 1 else 1)
                   for k in sorted({1, K})},
    }
    if all("reflection" in q for q in per_problem):        # (per-problem records from before it was measured lack it)
        result["reflection"] = rate_ci((q["reflection"] for q in per_problem), K)
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
    rows = [(f"pass@1 (mean of {K} samples), %", _cell(result["pass@1"], True), "Wilson, n_eff"),
            *([("pass@1 lenient (last number if no answer format), %", _cell(result["pass@1_lenient"], True),
                "Wilson, n_eff")] if "pass@1_lenient" in result else []),
            (f"cons@{K} (majority vote), %", _cell(result[f"cons@{K}"], True), "Wilson")]
    if "greedy" in result:
        rows.append(("greedy accuracy, %", _cell(result["greedy"], True), "Wilson"))
    if K > 1:
        rows.append((f"pass@{K} (unbiased), %", _cell(result["pass@k"][str(K)], True), "Wilson"))
    rows += [("format rate, %", _cell(result["format"], True), "Wilson, n_eff"),
             ("language consistency, %", _cell(result["language"], True), "Wilson, n_eff"),
             *([("reflection rate, %", _cell(result["reflection"], True), "Wilson, n_eff")]
               if "reflection" in result else []),
             ("mean length, tokens", _cell(result["length"], False), "t")]
    return rows


def markdown_table(result: dict) -> str:
    lines = [f"| metric ({result['n_problems']} problems) | mean [95% CI] | interval |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(result)]
    return "\n".join(lines) + "\n"
