"""Evaluation statistics against independent references: brute-force pass@k over subsets, scipy's
t quantiles (when installed), the Wilson formula's defining property, and an end-to-end eval."""

import itertools
import math
import random
import statistics
from fractions import Fraction

import pytest

import numpy as np

from nanoseek.eval import (_summary, completion_records, majority_vote, mean_ci, pass_at_k, rate_ci,
                           rate_interval, t_quantile, wilson_ci)
from nanoseek.tasks import Problem, get_family


def brute_pass_at_k(outcomes, k):
    """Exact fraction of k-subsets of the samples that contain a correct one."""
    subsets = list(itertools.combinations(outcomes, k))
    return Fraction(sum(any(s) for s in subsets), len(subsets))


def test_pass_at_k_matches_brute_force_over_subsets():
    rng = random.Random(0)
    for _ in range(40):
        n = rng.randint(1, 10)
        outcomes = [rng.random() < 0.3 for _ in range(n)]
        c = sum(outcomes)
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(float(brute_pass_at_k(outcomes, k)), abs=1e-12)
    assert pass_at_k(200, 3, 1) == pytest.approx(3 / 200)
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 150, 100) == 1.0


def test_t_quantile_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 7, 30, 250, 5000):
        for p in (0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-6)


def test_t_quantile_known_values():
    # table values (any statistics textbook): t_{0.975} for df = 1, 4, 10; large df tends to z
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(0.975, 4) == pytest.approx(2.7764, abs=1e-4)
    assert t_quantile(0.975, 10) == pytest.approx(2.2281, abs=1e-4)
    assert t_quantile(0.975, 100000) == pytest.approx(statistics.NormalDist().inv_cdf(0.975), abs=1e-4)


def test_mean_ci_formula():
    x = [0.0, 0.25, 0.5, 1.0, 0.75, 0.125]
    ci = mean_ci(x)
    m, s = statistics.mean(x), statistics.stdev(x)
    half = 2.5706 * s / math.sqrt(len(x))                         # t_{0.975, 5} from a table
    assert ci["n"] == 6 and ci["mean"] == pytest.approx(m)
    assert ci["lo"] == pytest.approx(m - half, abs=1e-4) and ci["hi"] == pytest.approx(m + half, abs=1e-4)
    rare = mean_ci([0.0] * 9 + [0.25], bounds=(0, 1))              # the t interval would cross 0
    assert rare["lo"] == 0 and rare["hi"] == pytest.approx(0.025 + 2.2622 * statistics.stdev([0.0] * 9 + [0.25]) / math.sqrt(10), abs=1e-4)


def test_wilson_interval_inverts_the_score_test():
    """Wilson's bounds are the p0 where |p̂ - p0| / sqrt(p0 (1 - p0) / n) = z: check that directly."""
    z = statistics.NormalDist().inv_cdf(0.975)
    for s, n in ((0, 10), (3, 10), (10, 10), (37, 120)):
        ci = wilson_ci(s, n)
        assert 0 <= ci["lo"] <= s / n <= ci["hi"] <= 1
        for p0 in (ci["lo"], ci["hi"]):
            if 0 < p0 < 1:
                assert abs(s / n - p0) / math.sqrt(p0 * (1 - p0) / n) == pytest.approx(z, rel=1e-9)


def test_majority_vote():
    assert majority_vote(["3", " 4", None, "4", "3 ", "4"]) == 1
    assert majority_vote(["7", "8"]) == 0                          # tie: the answer seen first
    assert majority_vote([None, None]) is None


def test_majority_vote_groups_answers_by_the_verifier():
    """cons@K votes on verified answers, not strings: every correct Countdown expression is one answer, others
    group by value; numbers group by value ("1,000" = "1000"); math-verify groups LaTeX forms."""
    cd = Problem("countdown", "Make 7.", "3 + 4", "", 5, {"numbers": [3, 4, 2, 1, 5], "target": 7})
    answers = ["3 + 4", "4 + 3", "3 * 2 + 1", "2 * 3 + 1", "5 + 1", "5 + 1"]
    same = lambda a, b: get_family(cd.family).same_answer(cd, a, b)            # noqa: E731
    assert majority_vote(answers) == 4                                          # strings: the wrong "5 + 1"
    assert majority_vote(answers, same) == 0                                    # verified: 4 of 6 are right
    assert majority_vote(["5 + 1", "4 + 2", "3 + 4", "2 * 3"], same) == 0       # wrong ones group by value (6)
    arith = Problem("arithmetic", "What is 999 + 1?", "1000", "", 3)
    same = lambda a, b: get_family("arithmetic").same_answer(arith, a, b)     # noqa: E731
    assert majority_vote(["1,001", "1,000", "1000", None, "1001.0", "1000.00"], same) == 1
    assert majority_vote(["12", "1,2", "1,2"], same) == 1                      # "1,2" is no number: text
    half = Problem("math", "Half?", "\\frac{1}{2}", "", 1)
    same = lambda a, b: get_family("math").same_answer(half, a, b)            # noqa: E731
    assert majority_vote(["2", "\\frac{1}{2}", "0.5", "2", "\\dfrac12"], same) == 1
    # tie rule: among the largest groups, the one whose first member was sampled earliest
    assert majority_vote(["9", "7", "7.0", "9"], same) == 0 and majority_vote(["1", "2"], same) == 0


def test_rate_interval_coverage_by_simulation():
    """95% intervals of pass@1 cover the true rate 93-97% of the time at 1%, 5%, 20% and 50%, for designs of
    30-100 problems × 4-8 samples whose per-problem rates vary (Beta with mean μ and concentration 1 and 2,
    intra-problem correlation 1/2 and 1/3, as problems are mostly solved always or never). With less spread
    between problems the interval turns conservative at the lowest rates (0.972 at 1% for 100 × 8 with
    concentration 2), never liberal. The Student-t interval over per-problem means it replaced covered
    0.47-0.83 at 1% and 0.85-0.92 at 5% in these designs (same seed)."""
    rng = np.random.default_rng(0)
    for c, reps, upper in ((1.0, 8000, 0.97), (2.0, 3000, 0.98)):
        for n, K in ((30, 4), (64, 4), (100, 8), (50, 8)):
            for mu in (0.01, 0.05, 0.2, 0.5):
                rates = rng.beta(mu * c, (1 - mu) * c, size=(reps, n))
                x = rng.binomial(K, rates) / K                                  # [reps, n] per-problem pass@1
                lo, hi = rate_interval(x, K)
                coverage = float(((lo <= mu) & (mu <= hi)).mean())
                assert 0.93 <= coverage <= upper, (c, n, K, mu, coverage)


def test_rate_ci_never_degenerate_at_zero_and_matches_wilson_without_clustering():
    zero = rate_ci([0.0] * 30, 4)
    z2 = statistics.NormalDist().inv_cdf(0.975) ** 2
    assert zero["lo"] == 0.0 and zero["hi"] == pytest.approx(z2 / (30 + z2))    # n_eff = n problems, not [0, 0]
    full = rate_ci([1.0] * 30, 4)
    assert full["hi"] == 1.0 and full["lo"] == pytest.approx(30 / (30 + z2))
    # one 0/1 outcome per problem (K = 1): exactly Wilson over the problems
    outcomes = [1.0] * 7 + [0.0] * 23
    w = wilson_ci(7, 30)
    assert rate_ci(outcomes, 1) == pytest.approx(w)
    # the evaluation summary: all-zero pass@1 has a non-empty interval
    per_problem = [{"correct": 0, "correct_lenient": 0, "format": 0.0, "language": 0.0, "length": 5, "cons": False}] * 40
    summary = _summary(per_problem, 4, False, 0.0)
    assert summary["pass@1"]["lo"] == 0.0 and summary["pass@1"]["hi"] > 0.05


# ---------------------------------------------------------------- evaluate(): bookkeeping on scripted samples

def test_evaluate_bookkeeping_on_scripted_completions(monkeypatch):
    """generate() is replaced by a script of completions, so every statistic is known independently."""
    import torch

    import nanoseek.sampling.rollout as rollout
    from nanoseek.eval import PassAtKConfig, evaluate
    from nanoseek.tasks import sample_problems
    from nanoseek.tokenizer import Tokenizer

    problems = sample_problems("arithmetic", 3, split="test", seed=3) + sample_problems("linear", 2, split="test", seed=3)
    K = 4
    rng = random.Random(0)
    script, greedy_script = [], []
    for p in problems:
        wrong = str(int(p.answer) + 1)
        for _ in range(K):
            ans, fmt = rng.choice([p.answer, wrong, wrong]), rng.random() < 0.6
            script.append((f" reasoning </think> <answer>{ans}</answer>" if fmt else f" so it is {ans}", ans, fmt))
        greedy_script.append(rng.choice([p.answer, wrong]))
    tok = Tokenizer.train([t for t, _, _ in script] + [p.prompt for p in problems], 300)
    calls = {"sample": 0, "greedy": 0}

    def fake_generate(model, prompts, cfg, stop_ids, pad_id=0, generator=None, on_token=None):
        kind = "greedy" if cfg.greedy else "sample"
        start = calls[kind]
        calls[kind] += len(prompts)
        texts = ([s[0] for s in script[start:start + len(prompts)]] if kind == "sample" else
                 [f" </think> <answer>{a}</answer>" for a in greedy_script[start:start + len(prompts)]])
        ids = [tok.encode(t) for t in texts]
        N = max(map(len, ids))
        tokens = torch.tensor([i + [0] * (N - len(i)) for i in ids])
        return rollout.Generation(tokens, torch.zeros(tokens.shape), torch.tensor([len(i) for i in ids]),
                                  ["stop"] * len(ids))

    monkeypatch.setattr(rollout, "generate", fake_generate)
    model = torch.nn.Linear(1, 1)
    res = evaluate(model, tok, problems, PassAtKConfig(samples=K, batch_size=7))

    # strict: only answers in <answer> tags count; lenient: the last number of untagged ones too
    per_correct = [sum(script[i * K + j][1] == p.answer and script[i * K + j][2] for j in range(K))
                   for i, p in enumerate(problems)]
    lenient = [sum(script[i * K + j][1] == p.answer for j in range(K)) for i, p in enumerate(problems)]
    assert per_correct != lenient                                      # the script exercises the difference
    assert res["n_problems"] == 5 and res["pass@1"]["mean"] == pytest.approx(sum(c / K for c in per_correct) / 5)
    assert res["pass@1_lenient"]["mean"] == pytest.approx(sum(c / K for c in lenient) / 5)
    for i, q in enumerate(res["per_problem"]):                         # what was judged is recorded
        assert q["answers"] == [script[i * K + j][1] if script[i * K + j][2] else None for j in range(K)]
        assert [c["correct"] for c in q["completions"]] == [
            script[i * K + j][2] and script[i * K + j][1] == problems[i].answer for j in range(2)]
        assert q["completions"][0]["completion"] == "<think>" + script[i * K][0]
    formats = [sum(script[i * K + j][2] for j in range(K)) / K for i in range(5)]
    assert res["format"]["mean"] == pytest.approx(sum(formats) / 5)
    cons = 0
    for i, p in enumerate(problems):
        votes = [script[i * K + j][1] for j in range(K) if script[i * K + j][2]]
        top = max(votes, key=lambda a: (votes.count(a), -votes.index(a))) if votes else None
        cons += top == p.answer
    assert res[f"cons@{K}"]["mean"] == pytest.approx(cons / 5)
    assert res["greedy"]["mean"] == pytest.approx(sum(a == p.answer for a, p in zip(greedy_script, problems)) / 5)
    lengths = [sum(len(tok.encode(script[i * K + j][0])) for j in range(K)) / K for i in range(5)]
    assert res["length"]["mean"] == pytest.approx(sum(lengths) / 5)
    assert res["pass@k"][str(K)]["mean"] == pytest.approx(sum(c > 0 for c in per_correct) / 5)
    logged = completion_records(res, 3)
    assert [r["prompt"] for r in logged] == [p.prompt for p in problems[:3]] and "completion" in logged[0]
    assert res["pass@1"]["n"] == 5 and res["pass@1"]["lo"] <= res["pass@1"]["mean"] <= res["pass@1"]["hi"]

    # by_family: one sampling pass over all problems (the same script), statistics split by family
    calls.update(sample=0, greedy=0)
    fam = evaluate(model, tok, problems, PassAtKConfig(samples=K, batch_size=7), by_family=True)
    assert list(fam) == ["arithmetic", "linear"] and calls["sample"] == 5 * K
    for name, rows in (("arithmetic", range(3)), ("linear", range(3, 5))):
        assert fam[name]["n_problems"] == len(rows)
        assert fam[name]["pass@1"]["mean"] == pytest.approx(sum(per_correct[i] / K for i in rows) / len(rows))
        assert fam[name]["format"]["mean"] == pytest.approx(sum(formats[i] for i in rows) / len(rows))
        assert [q["prompt"] for q in fam[name]["per_problem"]] == [problems[i].prompt for i in rows]


def test_eval_cli_errors_and_json(tmp_path):
    import json

    from conftest import make_base

    from nanoseek.cli import main

    base = make_base(tmp_path)
    assert main(["eval", "--checkpoint", str(base), "--tasks", "arithmetic", "--data", "x.jsonl"]) == 2
    assert main(["eval", "--checkpoint", str(tmp_path / "nope"), "--tasks", "arithmetic"]) == 2
    out = tmp_path / "res.json"
    assert main(["eval", "--checkpoint", str(base), "--tasks", "arithmetic", "--samples", "2", "--n-problems", "3",
                 "--max-new-tokens", "4", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_problems"] == 3 and res["samples"] == 2 and len(res["per_problem"]) == 3
