"""The RL loop's structure: `[rl]` / `[grpo]` / `[ppo]` sections, the advantage estimators' common interface,
and the run's problem source and reward function passed explicitly."""

import pytest
import torch

from nanoseek.config import ModelConfig
from nanoseek.errors import UserError
from nanoseek.model import build_model
from nanoseek.recipe import load_recipe
from nanoseek.rl.algorithms import GRPO, PPO
from nanoseek.rl.grpo import GRPOConfig, group_advantages
from nanoseek.rl.ppo import PPOConfig
from nanoseek.rl.trainer import RLConfig, make_batch
from nanoseek.train.optim import OptimConfig


def test_shared_knobs_live_in_rl_and_each_algorithm_keeps_its_own():
    cfg = load_recipe(RLConfig, None, ["rl.group_size=4", "rl.mu=2", "rl.beta=0.05", "grpo.scaling=none",
                                       "ppo.value_lr=1e-3"])
    assert (cfg.rl.group_size, cfg.rl.mu, cfg.rl.beta, cfg.grpo.scaling, cfg.ppo.value_lr) == (4, 2, 0.05, "none", 1e-3)
    for moved in ("grpo.group_size=4", "grpo.mu=2", "grpo.beta=0.1", "ppo.group_size=4"):
        with pytest.raises(UserError, match="unknown key"):
            load_recipe(RLConfig, None, [moved])
    with pytest.raises(UserError, match="rl.mu"):
        load_recipe(RLConfig, None, ["rl.mu=0"])


class _World1:
    distributed = False


def _batch():
    torch.manual_seed(0)
    prompts = [[3, 4], [5], [3, 4], [5]]
    completions = [[7, 8, 9], [7], [8, 8], [9, 7, 7]]
    return make_batch(prompts, completions, 0, torch.device("cpu"))


def test_estimators_share_one_interface():
    """GRPO: group-relative Â [N], no critic, nothing to checkpoint. PPO: Â [N, T] from its critic, which its
    own `update` trains while the policy's parameters stay as they are."""
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    batch = _batch()
    chunks = [slice(0, 2), slice(2, 4)]
    grpo = GRPO(GRPOConfig(), 2, _World1())
    torch.testing.assert_close(grpo.advantages(batch, rewards, chunks), group_advantages(rewards, 2))
    assert grpo.update(batch, chunks, 1.0) == {} and grpo.state_dict() == {}

    torch.manual_seed(0)
    policy = build_model(ModelConfig(vocab_size=16, hidden_size=16, num_hidden_layers=1, intermediate_size=32,
                                     kv_lora_rank=8, q_lora_rank=8, num_attention_heads=2, qk_nope_head_dim=4,
                                     qk_rope_head_dim=4, v_head_dim=4, num_nextn_predict_layers=0))
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    ppo = PPO(PPOConfig(value_lr=1e-2), policy, OptimConfig(lr=1e-2, weight_decay=0.0), mu=2, precision="fp32")
    adv = ppo.advantages(batch, rewards, chunks)
    assert adv.shape == batch["tokens"].shape
    head = ppo.value_model.head.weight.detach().clone()
    metrics = ppo.update(batch, chunks, 1.0)
    assert metrics["value_loss"] > 0 and not torch.equal(ppo.value_model.head.weight, head)
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())
    assert set(ppo.state_dict()) == {"value_model", "value_optimizer"}
