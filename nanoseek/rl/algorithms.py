"""What GRPO and PPO share, and the one place they differ: how a step's advantages are estimated.

Both sample `group_size` completions per prompt, score them with the same rewards, and update the policy
μ times on PPO's clipped objective (`nanoseek.rl.grpo.policy_loss`): those knobs are the `[rl]` section
(`RLCommonConfig`). The advantage estimator is an object with one small interface, so the training loop
(`nanoseek.rl.trainer.train_rl`) does not branch on the algorithm:

    advantages(batch, rewards, chunks) -> Â        GRPO: [N], one per completion;  PPO: [N, T], per token
    update(batch, chunks, lr_scale) -> metrics      after the policy's μ epochs: PPO trains its critic
    state_dict() / load_state_dict(state)           what a checkpoint must carry besides the policy

GRPO (DeepSeekMath §4.1): Â_i = (r_i − mean(r_group)) / (std + ε), no critic (its `[grpo]` section: the
scaling and ε). PPO: GAE over a learned critic's values (nanoseek.rl.ppo; its `[ppo]` section).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from nanoseek.errors import UserError
from nanoseek.recipe import Alias
from nanoseek.rl.grpo import AGGREGATIONS, RATIO_LEVELS, GRPOConfig, group_advantages
from nanoseek.rl.ppo import PPOConfig, ValueModel, gae, terminal_rewards, value_loss, whiten
from nanoseek.run import autocast
from nanoseek.train.optim import OptimConfig, build_optimizer, set_lr


@dataclass
class RLCommonConfig:
    """The `[rl]` section: sampling groups and the clipped policy update, the same for GRPO and PPO."""
    group_size: int = 8             # G completions per prompt
    eps_low: float = 0.2            # ratio clipped to [1 - eps_low, 1 + eps_high]
    eps_high: float = 0.28          # DAPO's clip-higher
    beta: float = 0.0               # k3 KL weight; 0 = no reference model at all
    aggregation: str = "dapo"       # "grpo" | "dapo" | "drgrpo"
    mu: int = 1                     # policy updates per rollout batch (μ), reusing the old log-probs
    dynamic_sampling: bool = False  # DAPO: drop zero-variance groups and sample more prompts
    max_refill: int = 3             # extra rollout rounds allowed to refill dropped groups
    oversample: float = 1.0         # dynamic sampling: the first round samples prompts x this many groups and the
                                    # step keeps the first `train.prompts` informative ones. On a GPU a decode step
                                    # costs about the same for 2x the rows, so one wide round beats refill rounds,
                                    # each a whole generation (README, RL metrics)
    tis_cap: float = 0.0            # truncated importance sampling: weight tokens by min(π_old/π_sampler, cap); 0 = off
    importance_sampling_level: str = "token"   # "token" (PPO/GRPO ratio per token) | "sequence" (GSPO, rl/grpo.py)
    mask_truncated_completions: bool = False   # completions cut at max_new_tokens get no policy (nor PPO critic)
                                               # loss; they still count in their group's advantages (TRL's knob)

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise UserError(f"rl.aggregation={self.aggregation!r}; choose one of {', '.join(AGGREGATIONS)}")
        if self.group_size < 2:
            raise UserError(f"rl.group_size={self.group_size}: a group needs at least 2 samples")
        if self.mu < 1:
            raise UserError(f"rl.mu={self.mu}: need at least one update per batch")
        if not (0 <= self.eps_low < 1 and self.eps_high >= 0):
            raise UserError(f"rl clip bounds eps_low={self.eps_low}, eps_high={self.eps_high}: need 0 <= eps_low < 1, eps_high >= 0")
        if self.beta < 0:
            raise UserError(f"rl.beta={self.beta} must be >= 0")
        if not self.oversample >= 1:
            raise UserError(f"rl.oversample={self.oversample} must be >= 1 (1 = sample exactly train.prompts groups)")
        if self.oversample > 1 and not self.dynamic_sampling:
            raise UserError(f"rl.oversample={self.oversample} only applies with rl.dynamic_sampling = true "
                            "(without it every sampled group is trained on); set one or unset the other")
        if self.importance_sampling_level not in RATIO_LEVELS:
            raise UserError(f"rl.importance_sampling_level={self.importance_sampling_level!r}; choose one of "
                            f"{', '.join(RATIO_LEVELS)}")
        if not self.tis_cap >= 0:                      # (NaN fails too)
            raise UserError(f"rl.tis_cap={self.tis_cap} must be >= 0 (0 = no importance-sampling correction)")


# TRL's GRPOConfig names (trl.GRPOConfig, TRL's GRPOTrainer) for the knobs whose meaning is the same here: top-level
# keys of a grpo/ppo recipe or `--set`, rewritten to the canonical key as the recipe is read (nanoseek.recipe.Alias).
# docs/trl.md has the table with what differs and what TRL has that nanoseek does not. Not aliased on purpose:
# loss_type "bnpo" (TRL: token mean per micro-batch, divided by the accumulation steps; "dapo" here is the token
# mean over the whole step, TRL's "dapo"), and TRL's other loss types (cispo, sapo, luspo, vespo).
TRL_GRPO_ALIASES = {
    "num_generations": Alias("rl.group_size"),
    "beta": Alias("rl.beta"),
    "epsilon": Alias("rl.eps_low"),
    "epsilon_high": Alias("rl.eps_high"),
    "num_iterations": Alias("rl.mu"),
    "loss_type": Alias("rl.aggregation", {"grpo": "grpo", "dapo": "dapo", "dr_grpo": "drgrpo"},
                       hint="TRL's \"bnpo\" (a token mean per micro-batch) is not offered: \"dapo\" is the token "
                            "mean over the whole step"),
    "scale_rewards": Alias("grpo.scaling", {True: "group", False: "none", "group": "group", "batch": "batch",
                                            "none": "none"}),
    "importance_sampling_level": Alias("rl.importance_sampling_level"),
    "mask_truncated_completions": Alias("rl.mask_truncated_completions"),
    "max_completion_length": Alias("sampling.max_new_tokens"),
    "temperature": Alias("sampling.temperature"),
    "top_p": Alias("sampling.top_p"),
    "top_k": Alias("sampling.top_k"),
    "learning_rate": Alias("optim.lr"),
    "reward_funcs": Alias("rewards.functions"),
    "reward_weights": Alias("rewards.weights"),
}


def response_slice(batch: dict) -> slice:
    """Columns of a `make_batch` row whose outputs predict the response tokens: P-1 .. P+T-2."""
    P, T = batch["P"], batch["tokens"].shape[1]
    return slice(P - 1, P - 1 + T)


class GRPO:
    """Group-relative advantages, no critic. Under data parallel each rank holds whole groups, so "group"
    scaling needs no communication; "batch" scaling divides by the std of EVERY rank's rewards."""

    def __init__(self, cfg: GRPOConfig, group_size: int, ctx):
        self.cfg, self.G, self.ctx = cfg, group_size, ctx

    def advantages(self, batch: dict | None, rewards: Tensor, chunks: list[slice]) -> Tensor:
        """rewards [N] (this rank's kept rows) -> Â [N]."""
        ctx = self.ctx
        if ctx.distributed and self.cfg.scaling == "batch":
            everyone = [None] * ctx.cfg.dp
            dist.all_gather_object(everyone, rewards.tolist(), group=ctx.dp_group)
            offset = sum(len(x) for x in everyone[:ctx.dp_rank])
            every = torch.tensor([t for x in everyone for t in x], device=rewards.device)
            return group_advantages(every, self.G, self.cfg.scaling, self.cfg.adv_eps)[offset:offset + len(rewards)]
        if not len(rewards):                               # a data-parallel rank without groups this step
            return rewards
        return group_advantages(rewards, self.G, self.cfg.scaling, self.cfg.adv_eps)

    def update(self, batch: dict, chunks: list[slice], lr_scale: float) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PPO:
    """GAE advantages over a learned critic (a copy of the policy with a scalar head), which is trained on
    the same batch after the policy's μ epochs, μ epochs too, with its own AdamW (lr `ppo.value_lr`, on the
    policy's schedule). The critic never feeds the policy's update within a step (the advantages are fixed
    before it), so training it after the policy equals training it between the policy's epochs."""

    def __init__(self, cfg: PPOConfig, policy: torch.nn.Module, optim: OptimConfig, mu: int, precision: str):
        self.cfg, self.mu, self.precision, self.grad_clip = cfg, mu, precision, optim.grad_clip
        self.value_model = ValueModel(policy)
        self.optimizer = build_optimizer(self.value_model, dataclasses.replace(optim, lr=cfg.value_lr))
        self.old_values = self.returns = None

    def values(self, batch: dict, rows: slice) -> Tensor:
        """V(s_t) [n, T] fp32 for the response tokens of `rows`."""
        with autocast(batch["ids"].device, self.precision):
            v = self.value_model(batch["ids"][rows], position_ids=batch["pos"][rows],
                                 attention_mask=batch["mask"][rows])
        return v[:, response_slice(batch)].float()

    def advantages(self, batch: dict, rewards: Tensor, chunks: list[slice]) -> Tensor:
        """rewards [N] (terminal) -> Â [N, T] by GAE (whitened over the batch's response tokens if asked)."""
        mask = batch["resp_mask"]
        with torch.no_grad():
            self.old_values = torch.cat([self.values(batch, c) for c in chunks])
        adv, self.returns = gae(terminal_rewards(rewards, batch["lengths"], mask.shape[1]), self.old_values, mask,
                                self.cfg.gamma, self.cfg.lam)                         # [N, T]
        return whiten(adv, mask) if self.cfg.whiten else adv

    def update(self, batch: dict, chunks: list[slice], lr_scale: float) -> dict:
        """μ epochs of the clipped value loss on the batch (token-weighted over chunks)."""
        mask = batch["resp_mask"]
        n_tok = float(mask.sum())
        set_lr(self.optimizer, self.cfg.value_lr * lr_scale)
        total = 0.0
        for _ in range(self.mu):
            for c in chunks:
                vl = value_loss(self.values(batch, c), self.old_values[c], self.returns[c], mask[c], self.cfg.value_clip)
                (vl * float(mask[c].sum()) / n_tok).backward()
                total += float(vl.detach()) * float(mask[c].sum()) / n_tok / self.mu
            torch.nn.utils.clip_grad_norm_(self.value_model.parameters(), self.grad_clip or math.inf)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return {"value_loss": total}

    def state_dict(self) -> dict:
        return {"value_model": self.value_model.state_dict(), "value_optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.value_model.load_state_dict(state["value_model"])
        self.optimizer.load_state_dict(state["value_optimizer"])
