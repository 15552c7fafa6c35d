"""The RL diagnostics: per-family / per-difficulty pass rates, zero-variance groups split by cause, reflection,
lengths of correct vs wrong completions, the clip fraction by side; in metrics.jsonl and plots of a tiny run."""

import math

import pytest
import torch

from nanoseek.rl.grpo import policy_loss


class _World1:
    distributed = False


def test_clip_fraction_splits_into_low_and_high_sides():
    """clip_low counts tokens clipped at ρ < 1 - eps_low (Â < 0), clip_high at ρ > 1 + eps_high (Â > 0),
    both by a float64 loop; they add up to clip_frac."""
    g = torch.Generator().manual_seed(3)
    B, T = 6, 9
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = (torch.arange(T)[None] < torch.randint(1, T + 1, (B,), generator=g)[:, None]).double()
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    _, stats = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28)
    low = high = n = 0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                rho, a = math.exp(logp[b, t].item() - old[b, t].item()), adv[b].item()
                n += 1
                low += a < 0 and rho < 0.8
                high += a > 0 and rho > 1.28
    assert low > 0 and high > 0
    assert stats["clip_low"].item() == pytest.approx(low / n, abs=1e-12)
    assert stats["clip_high"].item() == pytest.approx(high / n, abs=1e-12)
    assert (stats["clip_low"] + stats["clip_high"]).item() == pytest.approx(stats["clip_frac"].item(), abs=1e-12)


def test_rollout_metrics_by_hand():
    """Four groups of G = 2 with known outcomes: pass rates per family and difficulty, zero-variance groups
    split into all-wrong / all-right (a group that is all wrong but not flat is in neither), reflection,
    lengths of correct and wrong completions."""
    from nanoseek.rl.trainer import Experience, Sample, _rollout_metrics

    def s(acc, total, length, family, level, refl=False, trunc=False):
        return Sample({"accuracy": acc, "format": 1.0, "total": total}, length, trunc, family, level, refl)

    exp = Experience(sampled=[
        s(1.0, 1.2, 10, "arithmetic", 1, refl=True), s(1.0, 1.2, 20, "arithmetic", 1),      # flat, all right
        s(0.0, 0.2, 30, "linear", 2, trunc=True), s(0.0, 0.2, 40, "linear", 2, refl=True),  # flat, all wrong
        s(1.0, 1.2, 50, "linear", 1, refl=True), s(0.0, 0.2, 60, "linear", 1),              # informative
        s(0.0, 0.2, 70, "arithmetic", 2), s(0.0, 0.0, 80, "arithmetic", 2),                 # all wrong, not flat
    ], n_groups_sampled=4, n_groups_zero_var=2, gen_tokens=360, gen_time=2.0,
        prompts=[[1]] * 4)
    rec, kept = _rollout_metrics(exp, 2, _World1())
    want = {"accuracy": 3 / 8, "accuracy/arithmetic": 2 / 4, "accuracy/linear": 1 / 4, "accuracy/d1": 3 / 4,
            "accuracy/d2": 0.0, "zero_var_share": 0.5, "zero_var/all_wrong": 1 / 4, "zero_var/all_right": 1 / 4,
            "reflection": 3 / 8, "response_length": 45.0, "response_length/correct": 80 / 3,
            "response_length/wrong": 280 / 5, "truncated_share": 1 / 8, "reward/accuracy": 3 / 8,
            "reward/format": 1.0, "reward/total": 4.4 / 8, "groups": 2, "gen_tokens_per_s": 180.0}
    assert kept == 4
    assert rec == pytest.approx(want, abs=1e-12)


def test_tiny_grpo_run_logs_the_diagnostics_and_plots_them(tmp_path, base_checkpoint, monkeypatch):
    """Two GRPO steps on two task families: every diagnostic is in metrics.jsonl with the value the step's
    samples give (pass rates recounted here from the collected Experience; reflection judged on each
    rollout's response text), eval/reflection beside eval/pass@1, and each plot of the panel table is written."""
    import nanoseek.rl.trainer as trainer
    from nanoseek.files import read_jsonl
    from nanoseek.recipe import load_recipe

    cfg = load_recipe(trainer.RLConfig, None, [
        "train.steps=2", "train.prompts=4", "train.micro_batch=8", f'train.init="{base_checkpoint}"',
        'tasks.names=["arithmetic", "linear"]', "rl.group_size=2", "rl.mu=2", "rl.beta=0.1",
        "sampling.max_new_tokens=6", "eval.problems=2", "eval.samples=2", "eval.sampling.max_new_tokens=6",
        "eval.every=0", "eval.at_start=false", "checkpoint.every=0", "optim.lr=0.01", "optim.warmup_steps=0",
        "rewards.language=1.0"])
    collected = []
    real_collect = trainer.collect
    monkeypatch.setattr(trainer, "collect", lambda *a: collected.append(real_collect(*a)) or collected[-1])
    judged = []                                   # a micro model never writes a marker: every 2nd text reflects

    def every_other(text):
        judged.append(text)
        return len(judged) % 2 == 0
    monkeypatch.setattr(trainer, "reflects", every_other)
    trainer.train_rl(cfg, tmp_path / "run", progress=False)
    recs = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2] and len(collected) == 2
    assert len(judged) == 16 and all(t.startswith("<think>") for t in judged)    # the response as rewards read it
    for rec, exp in zip(recs, collected):
        samples = exp.sampled
        assert {s.family for s in samples} == {"arithmetic", "linear"}
        for fam in ("arithmetic", "linear"):
            mine = [s.rewards["accuracy"] for s in samples if s.family == fam]
            assert rec[f"accuracy/{fam}"] == pytest.approx(sum(mine) / len(mine))
        for level in {s.difficulty for s in samples}:
            mine = [s.rewards["accuracy"] for s in samples if s.difficulty == level]
            assert rec[f"accuracy/d{level}"] == pytest.approx(sum(mine) / len(mine))
        assert len(samples) == 8 and rec["reflection"] == 0.5
        assert 0 <= rec["zero_var/all_wrong"] + rec["zero_var/all_right"] <= rec["zero_var_share"] + 1e-12
        assert rec["clip_frac/low"] + rec["clip_frac/high"] == pytest.approx(rec["clip_frac"], abs=1e-9)
        for key in ("entropy", "kl", "grad_norm", "lr", "truncated_share", "reward/format"):
            assert key in rec, key
    assert 0 <= recs[-1]["eval/reflection"] <= 1
    for name in trainer.PLOT_PANELS:
        assert (tmp_path / "run" / "plots" / f"{name}.png").stat().st_size > 1000, name
