"""PPO with a learned critic: the baseline GRPO was designed to remove (DeepSeekMath §4.1).

PPO (Ouyang et al. 2022 style, for outcome rewards) needs a value model as large as the policy: here a
copy of the policy's trunk with a scalar head on its final hidden states. Per response token t it predicts
V(s_t), the return from the state before token t. With the terminal reward R at the last token,
generalised advantage estimation (Schulman et al. 2016) gives per-token advantages:

    δ_t = r_t + γ V_{t+1} - V_t          (r_t = R at the last token, else 0; V past the end = 0)
    A_t = Σ_l (γλ)^l δ_{t+l}             returns G_t = A_t + V_t (the value targets)

The policy uses the same clipped objective as GRPO (`nanoseek.rl.grpo.policy_loss`, advantages [B, T]
whitened over the batch); the critic regresses G_t with PPO's clipped value loss. Holding, training and
running that second model is the memory and time GRPO saves: `benchmarks/grpo_vs_ppo.py` measures it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class PPOConfig:
    gamma: float = 1.0              # discount (1: the single terminal reward reaches every token undiminished)
    lam: float = 0.95               # GAE λ
    value_clip: float = 0.2         # value predictions clipped to old ± value_clip in the loss
    value_lr: float = 1e-4          # the critic's AdamW learning rate (its own optimizer)
    whiten: bool = True             # normalise advantages over the batch's response tokens


class ValueModel(nn.Module):
    """A copy of the policy (trunk and all) plus a zero-initialised scalar head on `hidden_states`."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.backbone = copy.deepcopy(policy)
        self.backbone.requires_grad_(True)
        self.backbone.lm_head.requires_grad_(False)          # logits are computed but unused by the critic
        h = self.backbone.config.hidden_size
        self.head = nn.Linear(h, 1, device=self.backbone.lm_head.weight.device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids, position_ids=None, attention_mask=None) -> Tensor:
        """Values [B, S] in fp32, one per position."""
        h = self.backbone(input_ids, position_ids=position_ids, attention_mask=attention_mask).hidden_states
        return self.head(h).squeeze(-1).float()


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Advantages and returns [B, T] from per-token rewards, values and the response mask [B, T].

    Masked positions (after a row's end) have zero reward, value and advantage; the bootstrap value after a
    row's last token is 0 (the episode ends there).
    """
    m = mask.to(values.dtype)
    values = values * m
    rewards = rewards * m
    adv = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    T = values.shape[1]
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        running = (delta + gamma * lam * running) * m[:, t]
        adv[:, t] = running
    return adv, (adv + values) * m


def terminal_rewards(reward: Tensor, lengths: Tensor, T: int) -> Tensor:
    """[B, T] per-token rewards: the sequence reward [B] at each row's last response token, 0 elsewhere."""
    r = torch.zeros(reward.shape[0], T, dtype=reward.dtype, device=reward.device)
    r[torch.arange(len(reward), device=reward.device), lengths - 1] = reward
    return r


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked entries (population std); 0 outside the mask."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / n
    return (x - mean) / torch.sqrt(var + eps) * m


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float) -> Tensor:
    """PPO's clipped value loss, token mean: ½ mean max((V - G)², (old + clip(V - old, ±clip) - G)²)."""
    clipped = old_values + torch.clamp(values - old_values, -clip, clip)
    per_token = torch.maximum((values - returns) ** 2, (clipped - returns) ** 2)
    m = mask.to(values.dtype)
    return 0.5 * (per_token * m).sum() / m.sum().clamp(min=1)
