"""Evaluation statistics against independent references: brute-force pass@k over subsets, scipy's
t quantiles (when installed), the Wilson formula's defining property, and an end-to-end eval."""

import itertools
import math
import random
import statistics
from fractions import Fraction

import pytest

from nanoseek.eval import majority_vote, mean_ci, pass_at_k, t_quantile, wilson_ci


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

    per_correct = [sum(script[i * K + j][1] == p.answer for j in range(K)) for i, p in enumerate(problems)]
    assert res["n_problems"] == 5 and res["pass@1"]["mean"] == pytest.approx(sum(c / K for c in per_correct) / 5)
    formats = [sum(script[i * K + j][2] for j in range(K)) / K for i in range(5)]
    assert res["format"]["mean"] == pytest.approx(sum(formats) / 5)
    cons = 0
    for i, p in enumerate(problems):
        votes = [script[i * K + j][1] for j in range(K)]
        top = max(votes, key=lambda a: (votes.count(a), -votes.index(a)))
        cons += top == p.answer
    assert res[f"cons@{K}"]["mean"] == pytest.approx(cons / 5)
    assert res["greedy"]["mean"] == pytest.approx(sum(a == p.answer for a, p in zip(greedy_script, problems)) / 5)
    lengths = [sum(len(tok.encode(script[i * K + j][0])) for j in range(K)) / K for i in range(5)]
    assert res["length"]["mean"] == pytest.approx(sum(lengths) / 5)
    assert res["pass@k"][str(K)]["mean"] == pytest.approx(sum(c > 0 for c in per_correct) / 5)
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
