"""GRPO advantages and losses against float64 reference formulas written out loop by loop."""

import math
import random

import numpy as np
import pytest
import torch

from nanoseek.errors import UserError
from nanoseek.rl.algorithms import RLCommonConfig
from nanoseek.rl.grpo import GRPOConfig, aggregate, group_advantages, kl_k3, policy_loss, zero_variance_groups


def ref_advantages(rewards, G, scaling, eps):
    r = [float(x) for x in rewards]
    n = len(r)
    mean_all = sum(r) / n
    std_all = math.sqrt(sum((x - mean_all) ** 2 for x in r) / (n - 1))
    out = []
    for g in range(n // G):
        grp = r[g * G:(g + 1) * G]
        mu = sum(grp) / G
        sd = math.sqrt(sum((x - mu) ** 2 for x in grp) / (G - 1))
        for x in grp:
            if scaling == "group":
                out.append((x - mu) / (sd + eps))
            elif scaling == "batch":
                out.append((x - mu) / (std_all + eps))
            else:
                out.append(x - mu)
    return out


def ref_loss(logp, old, adv, mask, ref, eps_low, eps_high, beta, agg, max_len, weight=None):
    """Per-token double loop in float64; `weight` [B][T] multiplies the policy-gradient term only (TIS)."""
    B, T = len(logp), len(logp[0])
    per = [[0.0] * T for _ in range(B)]
    for b in range(B):
        for t in range(T):
            a = adv[b][t] if isinstance(adv[b], list) else adv[b]
            rho = math.exp(logp[b][t] - old[b][t])
            rho_c = min(max(rho, 1 - eps_low), 1 + eps_high)
            v = -min(rho * a, rho_c * a) * (1.0 if weight is None else weight[b][t])
            if ref is not None:
                d = ref[b][t] - logp[b][t]
                v += beta * (math.exp(d) - d - 1)
            per[b][t] = v
    if agg == "grpo":
        return sum(sum(per[b][t] * mask[b][t] for t in range(T)) / max(sum(mask[b]), 1) for b in range(B)) / B
    tot = sum(per[b][t] * mask[b][t] for b in range(B) for t in range(T))
    if agg == "dapo":
        return tot / sum(sum(row) for row in mask)
    return tot / (B * max_len)


def random_batch(seed, B=6, T=9):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)   # ratios well outside the clip range
    ref = logp + 0.5 * torch.randn(B, T, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    return logp, old, ref, mask


@pytest.mark.parametrize("scaling", ["group", "batch", "none"])
def test_advantages_match_reference(scaling):
    rng = random.Random(scaling)
    for G in (2, 4, 8):
        rewards = [rng.choice([0.0, 0.25, 1.0, 1.5]) + rng.random() * (rng.random() < 0.5) for _ in range(5 * G)]
        rewards[:G] = [1.0] * G                                  # one zero-variance group
        got = group_advantages(torch.tensor(rewards, dtype=torch.float64), G, scaling, eps=1e-4)
        np.testing.assert_allclose(got.numpy(), ref_advantages(rewards, G, scaling, 1e-4), rtol=1e-12, atol=1e-12)
        assert torch.all(got[:G] == 0)


def test_zero_variance_groups():
    r = torch.tensor([1, 1, 1, 0, 1, 0, 0.5, 0.5, 0.5])
    assert zero_variance_groups(r, 3).tolist() == [True, False, True]


@pytest.mark.parametrize("agg", ["grpo", "dapo", "drgrpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("token_adv", [False, True])
def test_policy_loss_matches_reference(agg, beta, token_adv):
    logp, old, ref, mask = random_batch(["grpo", "dapo", "drgrpo"].index(agg) * 4 + 2 * (beta > 0) + token_adv)
    B, T = logp.shape
    g = torch.Generator().manual_seed(7)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) if token_adv else torch.randn(B, generator=g, dtype=torch.float64)
    loss, stats = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, beta=beta,
                              ref_logp=ref if beta else None, aggregation=agg, max_len=12)
    want = ref_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), ref.tolist() if beta else None,
                    0.2, 0.28, beta, agg, 12)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - want) < 1e-12
    # clip fraction: tokens where the clipped branch is strictly smaller, counted by hand
    n_clip = n_tok = 0
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                a = adv[b, t].item() if token_adv else adv[b].item()
                rho = math.exp(logp[b, t].item() - old[b, t].item())
                n_tok += 1
                n_clip += (a > 0 and rho > 1.28) or (a < 0 and rho < 0.8)
    assert abs(stats["clip_frac"].item() - n_clip / n_tok) < 1e-12
    assert 0 < n_clip < n_tok                                       # the random batch exercises both branches


@pytest.mark.parametrize("agg", ["grpo", "dapo", "drgrpo"])
def test_tis_weight_scales_only_the_policy_gradient_term(agg):
    """Truncated importance sampling: the sampler's log-probs sit off the trainer's old ones; each token's
    clipped term is multiplied by w = min(exp(old − sampler), cap), the KL term is not (as TRL places it)."""
    from nanoseek.rl.tis import tis_weights

    logp, old, ref, mask = random_batch(11)
    g = torch.Generator().manual_seed(5)
    sampler = old + 0.8 * torch.randn(old.shape, generator=g, dtype=torch.float64)   # a deliberately off sampler
    adv = torch.randn(logp.shape[0], generator=g, dtype=torch.float64)
    cap = 1.5
    w = [[min(math.exp(o - s), cap) for o, s in zip(ro, rs)] for ro, rs in zip(old.tolist(), sampler.tolist())]
    loss, _ = policy_loss(logp, old, adv, mask, beta=0.04, ref_logp=ref, aggregation=agg, max_len=12,
                          weight=tis_weights(old, sampler, cap))
    want = ref_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), ref.tolist(), 0.2, 0.2, 0.04, agg, 12, w)
    assert abs(loss.item() - want) < 1e-12
    unweighted = ref_loss(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), ref.tolist(), 0.2, 0.2, 0.04,
                          agg, 12)
    assert abs(want - unweighted) > 1e-3                            # the weights did change the loss
    live = [x for row, mrow in zip(w, mask.tolist()) for x, m in zip(row, mrow) if m]
    assert min(live) < 1 and max(live) == cap                       # both sides of 1, and the cap binds


def test_policy_loss_gradient_matches_reference_derivative():
    """d loss / d logp at ρ inside the clip range is -ρ Â / (number of tokens) for DAPO aggregation."""
    logp, _, _, mask = random_batch(3)
    logp = logp.clone().requires_grad_(True)
    old = logp.detach() + 0.05
    adv = torch.randn(logp.shape[0], dtype=torch.float64)
    loss, _ = policy_loss(logp, old, adv, mask, aggregation="dapo")
    loss.backward()
    rho = torch.exp(logp.detach() - old)
    want = -rho * adv[:, None] * mask / mask.sum()
    torch.testing.assert_close(logp.grad, want, rtol=1e-12, atol=1e-14)


def ref_gspo(logp, old, adv, mask, eps_low, eps_high):
    """GSPO's objective (arXiv 2507.18071 §4.1), negated, sequence by sequence in float64:
    s_i = exp(mean over the |y_i| response tokens of (log π − log π_old)), clipped per sequence,
    loss = −(1/G) Σ_i min(s_i Â_i, clip(s_i, 1 − ε_low, 1 + ε_high) Â_i). Returns (loss, [s_i])."""
    total, ratios = 0.0, []
    for lp, o, a, m in zip(logp, old, adv, mask):
        n = sum(m)
        s = math.exp(sum((x - y) * k for x, y, k in zip(lp, o, m)) / n)
        ratios.append(s)
        total += -min(s * a, min(max(s, 1 - eps_low), 1 + eps_high) * a)
    return total / len(logp), ratios


def test_sequence_level_ratio_is_gspo():
    """importance_sampling_level="sequence" with the "grpo" aggregation is GSPO's objective: its value against
    the sequence-by-sequence float64 formula, its gradient against the paper's gradient analysis:
    d loss / d logp_it = −s_i Â_i / (G |y_i|) for a sequence whose ratio is inside the clip range (or on the side the min ignores),
    0 for a clipped one; and the clip is decided once per sequence."""
    logp, old, _, mask = random_batch(21, B=8)
    old = logp + 0.15 * (old - logp)                                # a spread of sequence ratios around the bounds
    logp = logp.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 1.5, -1.5], dtype=torch.float64)
    loss, stats = policy_loss(logp, old, adv, mask, eps_low=0.05, eps_high=0.05, aggregation="grpo",
                              level="sequence")
    want, s = ref_gspo(logp.tolist(), old.tolist(), adv.tolist(), mask.tolist(), 0.05, 0.05)
    assert abs(loss.item() - want) < 1e-12
    loss.backward()
    lengths = mask.sum(1).tolist()
    clipped = [(a > 0 and r > 1.05) or (a < 0 and r < 0.95) for a, r in zip(adv.tolist(), s)]
    assert 0 < sum(clipped) < len(s)                                # both cases occur
    for i, (a, r, n) in enumerate(zip(adv.tolist(), s, lengths)):
        g = 0.0 if clipped[i] else -r * a / (len(s) * n)
        torch.testing.assert_close(logp.grad[i], g * mask[i], rtol=1e-10, atol=1e-14)
    # the clip fraction counts tokens of clipped sequences; token level would clip token by token instead
    assert abs(stats["clip_frac"].item() - sum(n for n, c in zip(lengths, clipped) if c) / sum(lengths)) < 1e-12
    token, _ = policy_loss(logp.detach(), old, adv, mask, eps_low=0.05, eps_high=0.05, aggregation="grpo")
    assert abs(token.item() - want) > 1e-3


def test_sequence_level_equals_token_level_for_one_token_sequences():
    logp, old, _, _ = random_batch(4, T=1)
    adv = torch.randn(logp.shape[0], dtype=torch.float64)
    mask = torch.ones_like(logp)
    for agg in ("grpo", "dapo", "drgrpo"):
        a, _ = policy_loss(logp, old, adv, mask, aggregation=agg, max_len=3, level="sequence")
        b, _ = policy_loss(logp, old, adv, mask, aggregation=agg, max_len=3, level="token")
        assert abs(a.item() - b.item()) < 1e-14


def test_kl_k3_nonnegative_and_unbiased():
    # k3 = r - log r - 1 with r = π_ref/π_θ; E_{x~π_θ}[k3] = KL(π_θ || π_ref) exactly, checked on a small
    # categorical in float64 by enumerating outcomes.
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    k3 = kl_k3(p.log(), q.log())
    assert torch.all(k3 >= 0)
    exact = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    assert abs((p * k3).sum().item() - exact) < 1e-12


@pytest.mark.parametrize("agg", ["grpo", "dapo", "drgrpo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_padded_slots_never_make_nan(agg, beta):
    """Padded slots may hold any log-prob: a > 88-nat gap there (exp = inf in fp32, inf * 0 = NaN) must change
    neither the loss nor the gradient, which equal those of the same batch with benign padding."""
    logp, old, ref, mask = (t.float() for t in random_batch(5))
    assert (mask == 0).any()
    adv = torch.randn(logp.shape[0])
    pad = mask == 0
    wild = (logp.masked_fill(pad, -200.0), old.masked_fill(pad, -1.0), ref.masked_fill(pad, -1.0))
    results = []
    for lp, o, r in ((logp, old, ref), wild):
        lp = lp.clone().requires_grad_(True)
        loss, stats = policy_loss(lp, o, adv, mask, beta=beta, ref_logp=r, aggregation=agg, max_len=12)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(lp.grad).all() and torch.isfinite(stats["kl"])
        results.append((loss.detach(), lp.grad, stats["kl"], stats["ratio"]))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("agg", ["grpo", "dapo", "drgrpo"])
def test_micro_batches_add_up_to_full_batch(agg):
    logp, old, ref, mask = random_batch(11, B=8)
    adv = torch.randn(8, dtype=torch.float64)
    full, _ = policy_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1, aggregation=agg, max_len=16)
    parts = sum(policy_loss(logp[i:i + 3], old[i:i + 3], adv[i:i + 3], mask[i:i + 3], ref_logp=ref[i:i + 3],
                            beta=0.1, aggregation=agg, max_len=16, n_seqs=8, n_tokens=mask.sum().item())[0]
                for i in range(0, 8, 3))
    assert abs(full.item() - parts.item()) < 1e-12


def test_aggregate_modes_by_hand():
    per = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(per, mask, "grpo").item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(per, mask, "dapo").item() == pytest.approx(10.0 / 4)
    assert aggregate(per, mask, "drgrpo", max_len=5).item() == pytest.approx(10.0 / 10)


def test_config_validation():
    with pytest.raises(UserError, match="scaling"):
        GRPOConfig(scaling="std")
    with pytest.raises(UserError, match="aggregation"):
        RLCommonConfig(aggregation="mean")
    with pytest.raises(UserError, match="group_size"):
        RLCommonConfig(group_size=1)
    for bad in (-0.5, float("nan")):
        with pytest.raises(UserError, match="tis_cap"):
            RLCommonConfig(tis_cap=bad)
    assert RLCommonConfig().tis_cap == 0 and RLCommonConfig(tis_cap=2.0).tis_cap == 2.0


@pytest.mark.parametrize("scaling,agg", [("group", "grpo"), ("none", "drgrpo"), ("batch", "dapo")])
def test_grpo_solves_a_bandit(scaling, agg):
    """Sign and scale check of the whole objective: a 6-armed bandit (one 'token' per completion) where arm 3
    pays 1 is learned from group-relative advantages within 60 updates, for every advantage/aggregation mode."""
    torch.manual_seed(0)
    logits = torch.zeros(6, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.1)
    G = 8
    for _ in range(60):
        with torch.no_grad():
            actions = torch.multinomial(torch.softmax(logits, -1), 4 * G, replacement=True)    # 4 groups
        rewards = (actions == 3).double()
        adv = group_advantages(rewards, G, scaling)
        logp = torch.log_softmax(logits, -1)[actions][:, None]                                 # [B, 1]
        loss, _ = policy_loss(logp, logp.detach(), adv.float(), torch.ones_like(logp), aggregation=agg, max_len=1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.softmax(logits, -1)[3] > 0.9


# ---------------------------------------------------------------- the training loop, end to end

def tiny_rl_config(init, steps):
    from nanoseek.rl.trainer import RLConfig
    from nanoseek.recipe import load_recipe

    return load_recipe(RLConfig, None, [
        f"train.steps={steps}", "train.prompts=2", "train.micro_batch=3", f'train.init="{init}"',
        "rl.group_size=3", "rl.mu=2", "rl.beta=0.1", "sampling.max_new_tokens=6", "eval.problems=2",
        "eval.samples=2", "eval.sampling.max_new_tokens=6", "eval.every=1", "checkpoint.every=0", "optim.lr=0.01",
        "optim.warmup_steps=0", "rewards.language=1.0"])   # random text scores varied language shares: a signal


def test_grpo_loop_runs_logs_and_resumes_exactly(tmp_path, base_checkpoint):
    from nanoseek.files import read_jsonl
    from nanoseek.rl.trainer import train_rl

    base = base_checkpoint
    train_rl(tiny_rl_config(base, 2), tmp_path / "full", progress=False)
    full = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in full] == [0, 1, 2]
    for key in ("reward/accuracy", "reward/format", "reward/total", "accuracy", "response_length", "kl", "entropy",
                "clip_frac", "zero_var_share", "gen_tokens_per_s", "train_tokens_per_s", "eval/pass@1"):
        assert key in full[2], key
    assert full[2]["kl"] > 0                          # two updates at lr 0.01 moved the policy off the reference
    logged = full[2]["eval/completions"]             # judged samples of the evaluation, as TRL's log_completions
    assert len(logged) == 2 and {"prompt", "gold", "completion", "answer", "correct"} <= set(logged[0])
    for f in ("plots/reward.png", "plots/accuracy.png", "plots/response_length.png", "eval/step-2.json",
              "checkpoints/step-2/trainer_state/state.json", "final/config.json", "final/tokenizer.json", "config.toml"):
        assert (tmp_path / "full" / f).is_file(), f

    train_rl(tiny_rl_config(base, 1), tmp_path / "part", progress=False)     # stop after step 1 ...
    train_rl(tiny_rl_config(base, 2), tmp_path / "part", resume=True, progress=False)   # ... and resume
    part = read_jsonl(tmp_path / "part" / "metrics.jsonl")
    assert [r["step"] for r in part] == [0, 1, 2]
    for a, b in zip(full, part):
        for k in a:
            if not k.endswith("_per_s") and k != "step_time":
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k


def test_dynamic_sampling_drops_flat_groups_and_refills(monkeypatch):
    """DAPO §3.2: groups whose rewards are all equal are dropped and more prompts sampled, within max_refill."""
    import nanoseek.rl.trainer as trainer
    from nanoseek.sampling.rollout import Generation
    from nanoseek.tasks import Problem

    G = 3
    cfg = trainer.RLConfig()
    cfg.train.prompts, cfg.rl.group_size, cfg.rl.dynamic_sampling, cfg.rl.max_refill = 4, G, True, 5
    draws = []

    def problems_fn(n, seed):                     # 2 of every 3 problems give the whole group the same reward
        draws.append(n)
        return [Problem("arithmetic", "good" if (seed + i) % 3 == 0 else "flat", "1", "", 1) for i in range(n)]

    def fake_generate(model, prompts, sampling, stop, pad_id, gen):
        n = len(prompts)
        return Generation(torch.ones(n, 2, dtype=torch.long), torch.zeros(n, 2), torch.full((n,), 2), ["stop"] * n)

    calls = iter(range(10**6))
    monkeypatch.setattr(trainer, "generate", fake_generate)
    monkeypatch.setattr(trainer, "encode_prompt", lambda tok, q, template, system="": [5, 6] if q == "good" else [7])
    monkeypatch.setattr(trainer, "compute_rewards_batch", lambda rc, ps, texts, ns: [
        {"total": float(next(calls) % 2) if p.prompt == "good" else 0.5} for p in ps])

    class Tok:
        eos_id, pad_id = 0, 0
        token_id = staticmethod(lambda s: 1)
        decode = staticmethod(lambda ids, skip_special_tokens=False: "x")

    exp = trainer.collect(torch.nn.Linear(1, 1), Tok(), cfg, step=0, problems_fn=problems_fn)
    assert len(exp.prompts) == 4 * G and all(p == [5, 6] for p in exp.prompts)      # only informative groups
    assert draws[0] == 4 and all(b <= a for a, b in zip(draws, draws[1:])) and len(draws) > 1  # refills: what is missing
    assert exp.n_groups_sampled == sum(draws) and exp.n_groups_sampled - exp.n_groups_zero_var >= 4
    assert len(exp.sampled) == sum(draws) * G                                        # metrics see every sample
    cfg.rl.oversample = 3.0                          # one wide first round: 12 problems, 4 informative, no refill
    draws.clear()
    exp = trainer.collect(torch.nn.Linear(1, 1), Tok(), cfg, step=0, problems_fn=problems_fn)
    assert draws == [12] and len(exp.prompts) == 4 * G and all(p == [5, 6] for p in exp.prompts)
    assert len(exp.sampled) == 12 * G
    cfg.rl.oversample = 6.0                          # more informative groups than the batch holds: capped at 4
    exp = trainer.collect(torch.nn.Linear(1, 1), Tok(), cfg, step=0, problems_fn=problems_fn)
    assert len(exp.prompts) == 4 * G
    cfg.rl.oversample = 1.0
    cfg.rl.dynamic_sampling = False                                                 # off: flat groups are kept
    draws.clear()
    exp = trainer.collect(torch.nn.Linear(1, 1), Tok(), cfg, step=0, problems_fn=problems_fn)
    assert draws == [4] and len(exp.prompts) == 4 * G
    from nanoseek.errors import UserError
    from nanoseek.rl.algorithms import RLCommonConfig
    with pytest.raises(UserError, match="oversample"):
        RLCommonConfig(oversample=2.0)                # without dynamic sampling
    with pytest.raises(UserError, match="oversample"):
        RLCommonConfig(dynamic_sampling=True, oversample=0.5)


def test_sampler_logprobs_reach_the_update_and_agree_with_the_trainer(tmp_path, base_checkpoint):
    """The rollout engine's per-token log-probs travel through collect/make_batch into the update, where
    epoch 0's log-probs (θ = θ_old) are compared with them: on the CPU in fp32 the two are the same numbers
    up to rounding, and the TIS weights they give (rl.tis_cap) are then ~1."""
    from nanoseek.files import read_jsonl
    from nanoseek.rl.trainer import train_rl

    cfg = tiny_rl_config(base_checkpoint, 1)
    cfg.eval.problems, cfg.rl.tis_cap = 0, 2.0
    train_rl(cfg, tmp_path / "run", progress=False)
    rec = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    assert 0 <= rec["rollout/logprob_gap"] < 1e-4


def _micro_policy():
    from nanoseek.config import ModelConfig
    from nanoseek.model import build_model

    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                                   kv_lora_rank=8, q_lora_rank=8, num_attention_heads=2, qk_nope_head_dim=4,
                                   qk_rope_head_dim=4, v_head_dim=4, num_nextn_predict_layers=0)).eval()


def test_update_weights_tokens_by_the_truncated_ratio_to_a_perturbed_sampler():
    """A sampler whose log-probs are off the trainer's by δ per token: the update logs mean |δ| as the gap, and
    with rl.tis_cap the loss is the float64 formula −Σ min(e^δ, cap)·Â / Σ m (epoch 0, ρ = 1), its gradient
    scaled by the weights; with tis_cap = 0 the loss is bit-identical to an update without sampler log-probs."""
    import copy

    from nanoseek.model.chunked_ce import token_logprobs
    from nanoseek.parallel import Parallel
    from nanoseek.rl.trainer import RLConfig, StepCounts, _response_logits, make_batch, update_policy

    model = _micro_policy()
    prompts, completions = [[3, 4], [5], [3, 4], [5]], [[7, 8, 9], [7], [8, 8], [9, 7, 7]]
    plain = make_batch(prompts, completions, 0, torch.device("cpu"))
    with torch.no_grad():
        train = token_logprobs(_response_logits(model, plain, slice(0, 4), "fp32"), plain["tokens"])   # [4, 3]
    mask = plain["resp_mask"].double()
    adv = torch.tensor([1.0, -0.5, 0.3, -1.2])
    chunks = [slice(0, 3), slice(3, 4)]                       # two micro-batches: shares must add up

    class Grads(torch.optim.SGD):
        """Records the gradient the update's step would apply (parameters left as they are)."""
        def step(self, closure=None):
            self.seen = torch.cat([torch.zeros(p.numel()) if p.grad is None else p.grad.flatten()
                                   for g in self.param_groups for p in g["params"]])

    def update(delta, cap):
        """The update (no clipping) with the sampler at train − δ; (metrics, the step's gradient)."""
        cfg = RLConfig()
        cfg.rl.mu, cfg.rl.beta, cfg.rl.aggregation, cfg.rl.tis_cap, cfg.optim.grad_clip = 1, 0.0, "dapo", cap, 0.0
        m = copy.deepcopy(model)
        opt = Grads(m.parameters(), lr=1.0)
        batch = plain if delta is None else make_batch(prompts, completions, 0, torch.device("cpu"),
                                                       [(train - delta)[i, :len(c)] for i, c in enumerate(completions)])
        par = Parallel.single(m)
        metrics, _ = update_policy(m, opt, par, None, batch, chunks, adv, StepCounts.of(batch, 4, par.ctx), cfg)
        return metrics, opt.seen

    g = torch.Generator().manual_seed(3)
    delta = 0.7 * torch.randn(4, 3, generator=g)
    cap = 1.5
    metrics, _ = update(delta, cap)
    w = torch.clamp(torch.exp(delta.double()), max=cap)
    assert ((w < 1) & (mask > 0)).any() and ((w == cap) & (mask > 0)).any()       # both sides, and the cap binds
    want = float(-(w * adv.double()[:, None] * mask).sum() / mask.sum())
    assert metrics["loss"] == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert metrics["rollout/logprob_gap"] == pytest.approx(float((delta.double().abs() * mask).sum() / mask.sum()),
                                                           rel=1e-6)

    off, step_off = update(delta, 0.0)                       # default: measured, not corrected
    none, step_none = update(None, 0.0)
    assert off["loss"] == none["loss"] and torch.equal(step_off, step_none) and "rollout/logprob_gap" not in none
    assert off["loss"] == pytest.approx(float(-(adv.double()[:, None] * mask).sum() / mask.sum()), rel=1e-6)
    half, step_half = update(torch.full((4, 3), math.log(0.5)), cap)     # w = 0.5 everywhere: half the gradient
    torch.testing.assert_close(step_half, 0.5 * step_none, rtol=1e-5, atol=1e-8)
