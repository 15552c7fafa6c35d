"""PPO pieces against float64 references: GAE by its definition as a discounted sum of TD errors, the
clipped value loss by hand, whitening, and the value model's shapes and gradients."""

import math

import pytest
import torch

from nanoseek.config import ModelConfig
from nanoseek.model import build_model
from nanoseek.rl.ppo import ValueModel, gae, terminal_rewards, value_loss, whiten


def ref_gae(rewards, values, length, gamma, lam):
    """A_t = Σ_{l >= 0} (γλ)^l δ_{t+l}, δ_t = r_t + γ V_{t+1} - V_t, V_length = 0; written as the sum."""
    v = values[:length] + [0.0]
    deltas = [rewards[t] + gamma * v[t + 1] - v[t] for t in range(length)]
    adv = [sum((gamma * lam) ** l * deltas[t + l] for l in range(length - t)) for t in range(length)]
    return adv, [a + values[t] for t, a in enumerate(adv)]


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0)])
def test_gae_matches_definition(gamma, lam):
    g = torch.Generator().manual_seed(0)
    B, T = 5, 9
    lengths = torch.tensor([9, 1, 4, 7, 2])
    mask = (torch.arange(T)[None] < lengths[:, None]).double()
    R = torch.randn(B, generator=g, dtype=torch.float64)
    rewards = terminal_rewards(R, lengths, T) + 0.1 * torch.randn(B, T, generator=g, dtype=torch.float64) * mask
    values = torch.randn(B, T, generator=g, dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for b in range(B):
        n = int(lengths[b])
        want_adv, want_ret = ref_gae(rewards[b].tolist(), values[b].tolist(), n, gamma, lam)
        assert adv[b, :n].tolist() == pytest.approx(want_adv, abs=1e-12)
        assert ret[b, :n].tolist() == pytest.approx(want_ret, abs=1e-12)
        assert torch.all(adv[b, n:] == 0) and torch.all(ret[b, n:] == 0)


def test_terminal_rewards_sit_on_the_last_token():
    r = terminal_rewards(torch.tensor([1.0, -2.0]), torch.tensor([3, 1]), 4)
    assert r.tolist() == [[0, 0, 1, 0], [-2, 0, 0, 0]]


def test_value_loss_by_hand():
    v = torch.tensor([[1.0, 0.5], [0.0, 3.0]], dtype=torch.float64)
    old = torch.tensor([[0.5, 0.5], [0.5, 0.0]], dtype=torch.float64)
    ret = torch.tensor([[2.0, 0.0], [1.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]])
    terms = []
    for b, t in ((0, 0), (0, 1), (1, 0)):
        vc = old[b, t] + min(max(v[b, t] - old[b, t], -0.2), 0.2)
        terms.append(max((v[b, t] - ret[b, t]) ** 2, (vc - ret[b, t]) ** 2))
    assert value_loss(v, old, ret, mask, 0.2).item() == pytest.approx(0.5 * sum(terms) / 3, abs=1e-12)


def test_whiten():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    w = whiten(x, mask)
    vals = [1.0, 2.0, 3.0, 4.0]
    mu, sd = sum(vals) / 4, math.sqrt(sum((a - 2.5) ** 2 for a in vals) / 4)
    assert w[:, :2].flatten().tolist() == pytest.approx([(a - mu) / sd for a in vals], abs=1e-6)
    assert torch.all(w[:, 2] == 0)


def test_value_model_is_a_separate_copy_with_a_zero_head():
    torch.manual_seed(0)
    policy = build_model(ModelConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                     kv_lora_rank=16, q_lora_rank=16))
    vm = ValueModel(policy)
    ids = torch.randint(0, 64, (2, 5))
    v = vm(ids)
    assert v.shape == (2, 5) and v.dtype == torch.float32 and torch.all(v == 0)
    value_loss(v, v.detach(), torch.ones(2, 5), torch.ones(2, 5), 0.2).backward()
    assert vm.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in policy.parameters())            # the policy is untouched
    assert vm.backbone.model.embed_tokens.weight.data_ptr() != policy.model.embed_tokens.weight.data_ptr()


def test_ppo_loop_trains_the_critic_and_checkpoints_it(tmp_path):
    from conftest import make_base
    from test_grpo import tiny_rl_config

    from nanoseek.files import read_jsonl
    from nanoseek.rl.trainer import train_rl
    from nanoseek.run.checkpoint import load_trainer_state

    cfg = tiny_rl_config(make_base(tmp_path), 2)
    cfg.eval.problems = 0
    train_rl(cfg, tmp_path / "ppo", algo="ppo", progress=False)
    recs = read_jsonl(tmp_path / "ppo" / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2] and all(r["value_loss"] > 0 for r in recs)
    state = load_trainer_state(tmp_path / "ppo" / "checkpoints" / "step-2")
    assert state["value_model"]["head.weight"].abs().sum() > 0          # the zero-initialised head learned
    assert "value_optimizer" in state
