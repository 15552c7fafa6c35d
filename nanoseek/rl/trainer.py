"""The RL loop: rollouts → rule rewards → GRPO (or PPO) updates, with metrics, plots and checkpoints.

One step (DeepSeekMath Alg. 1, outcome supervision; R1 report §2.2), as `train_rl` reads:

    1. collect      sample `prompts` problems; generate `rl.group_size` completions each with the current
                    policy (π_old); score each with the run's reward function        nanoseek.sampling.rewards
                    [DAPO dynamic sampling: drop groups whose rewards are all equal, sample more, bounded rounds]
    2. advantages   GRPO: Â = group-relative advantage per completion                nanoseek.rl.algorithms.GRPO
                    PPO:  Â_t = GAE over a learned critic's values                    nanoseek.rl.algorithms.PPO
    3. update       μ times: one AdamW step on the clipped objective (+ β·KL to the frozen initial model);
                    then PPO trains its critic on the same batch

Config: `[rl]` holds what both algorithms share (group size, clip bounds, β, aggregation, μ, dynamic
sampling), `[grpo]` and `[ppo]` their own knobs. The problem source and the reward function are built once
per run from the task families (the built-in ones plus any passed to `train_rl`, e.g. stage 4's general
prompts scored by a reward model); nothing is registered globally.

Iteration 0 of the μ updates runs at θ = θ_old, so its log-probs ARE the old log-probs: we keep them
instead of paying a separate forward. The policy stays in eval mode throughout (no dropout exists; it only
stops MoE layers counting expert loads), and the router biases are frozen: aux-free balancing is a
pretraining mechanism. Problems are drawn from a seed that is a function of (seed, step, round), so a
resumed run samples exactly what the uninterrupted one would have.

Under torchrun (GRPO only) the policy is replicated on every rank (parallel.dp_mode ddp or hfreduce): each
rank takes a round-robin share of the step's problems, so whole groups live on one rank and their
advantages need no communication, samples them with its own generator, and computes its rows' loss with
the step's GLOBAL sequence and token counts (× dp, as the gradient average divides by dp); gradients are
averaged once per update, so every rank applies the same step. Rank 0 evaluates, logs the metrics of all
ranks' rollouts, and writes checkpoints, which are single-process files any layout resumes.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, NamedTuple, Sequence

import torch
import torch.distributed as dist

from nanoseek.errors import UserError
from nanoseek.eval import PassAtKConfig, completion_records, evaluate
from nanoseek.files import atomic_write_bytes, atomic_write_json, read_jsonl
from nanoseek.hf import load_pretrained
from nanoseek.model import set_activation_checkpointing
from nanoseek.model.chunked_ce import token_entropy, token_logprobs
from nanoseek.parallel import Parallel, ParallelConfig, parallelize
from nanoseek.rl.algorithms import GRPO, PPO, TRL_GRPO_ALIASES, RLCommonConfig, response_slice
from nanoseek.rl.grpo import GRPOConfig, policy_loss, zero_variance_groups
from nanoseek.rl.ppo import PPOConfig
from nanoseek.rl.tis import logprob_gap, tis_weights
from nanoseek.run import (autocast, check_run_dir, checkpoint_dtype, export_final, join_ranks, load_init, rank0_first,
                          resolve_device, start_run, steps_with_gc)
from nanoseek.run.checkpoint import load_trainer_state, save_checkpoint
from nanoseek.sampling.reflection import reflects
from nanoseek.sampling.rewards import RewardConfig, compute_rewards_batch, load_reward_functions
from nanoseek.sampling.rollout import SamplingConfig, encode_prompt, generate, left_pad, response_text, stop_conditions
from nanoseek.tasks import FAMILIES, TaskFamily, sample_problems
from nanoseek.tasks.jsonl import load_jsonl_problems
from nanoseek.tasks.problems import load_problems
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.logger import MetricsLogger
from nanoseek.train.lora import BaseModel, LoRAConfig, apply_lora, finish_lora, resume_adapter
from nanoseek.train.optim import OptimConfig, build_optimizer, set_lr, wsd_lr
from nanoseek.train.trainer import CheckpointConfig, NullLogger, compile_enabled, compile_for_training


@dataclass
class RLTrainConfig:
    steps: int = 100
    prompts: int = 16               # prompts per step; each is sampled rl.group_size times
    micro_batch: int = 64           # rows per forward/backward (gradients accumulate over a step)
    init: str = ""                  # model directory to start from; also the frozen KL reference
    device: str = "auto"
    precision: str = "fp32"         # "fp32" | "bf16" (autocast)
    compile: bool | str = "auto"    # the update's forward compiled (trainer.compile_for_training); rollouts stay eager
    activation_checkpointing: bool = False  # recompute decoder layers in the update's backward (model/recompute.py)
    seed: int = 0
    threads: int = 0                # torch CPU threads; 0 = torch's default

    def __post_init__(self) -> None:
        compile_enabled(self.compile, torch.device("cpu"))  # a bad value fails as the recipe is read


@dataclass
class TaskConfig:
    names: list[str] = field(default_factory=lambda: ["arithmetic"])   # task families (nanoseek.tasks)
    difficulty: int | dict | None = None  # one level, or {family: level}; None = each family's default mix
    data: str = ""                  # a JSONL file of training problems instead of generated ones
    template: str = "r1_zero"       # prompt format for training rollouts: "r1_zero" | "chat" | "plain"
    system_prompt: str = ""         # a system turn before each question (chat template), in rollouts and evaluation

    def __post_init__(self) -> None:
        if self.system_prompt and self.template != "chat":
            raise UserError(f"tasks.system_prompt needs tasks.template = \"chat\", not {self.template!r}")


@dataclass
class RLEvalConfig(PassAtKConfig):
    """Evaluation during RL. It decodes and judges as the rollouts do: the run's sampling.stop (eval.sampling
    sets the rest: temperature, top-p, max_new_tokens), the run's answer format, and tasks.template unless
    eval.template names another."""
    every: int = 25                 # evaluate every N steps and after the last; 0 = only after the last
    problems: int = 64              # held-out problems (0 = no eval): the first N of `data`, else TEST-split
                                    # problems of the training task families (none when training on tasks.data)
    data: str = ""                  # a JSONL of test problems (GSM8K / MATH / question-answer, as tasks.data)
    at_start: bool = True           # also evaluate the initial model, logged as step 0
    samples: int = 4
    template: str = ""              # "" = tasks.template


@dataclass
class RLConfig:
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    tasks: TaskConfig = field(default_factory=TaskConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=64))
    rl: RLCommonConfig = field(default_factory=RLCommonConfig)     # what GRPO and PPO share
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=5, decay_frac=0.0,
                                                                   min_lr_ratio=1.0, weight_decay=0.0))
    eval: RLEvalConfig = field(default_factory=RLEvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=50, keep_last=2))
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig(dp_mode="ddp"))   # under torchrun
    lora: LoRAConfig = field(default_factory=LoRAConfig)          # lora.r > 0: train adapters only (train/lora.py)
    ALIASES: ClassVar[dict] = TRL_GRPO_ALIASES     # TRL's names for the same knobs (docs/trl.md)

    def __post_init__(self) -> None:
        template = self.eval.template or self.tasks.template
        if self.tasks.system_prompt and self.eval.problems and template != "chat":
            raise UserError(f"tasks.system_prompt is also used in evaluation, which needs eval.template = \"chat\", "
                            f"not {template!r}")
        if self.eval.sampling.stop not in (self.sampling.stop, SamplingConfig().stop):
            raise UserError(f"eval.sampling.stop={self.eval.sampling.stop}: evaluation during RL stops where the "
                            f"rollouts stop; set sampling.stop instead")


class Sample(NamedTuple):
    """One sampled completion as the step's metrics read it (every row, kept by dynamic sampling or not)."""
    rewards: dict                   # each reward component + "total"
    length: int                     # completion tokens
    truncated: bool                 # stopped by max_new_tokens
    family: str                     # the problem's task family ...
    difficulty: int                 # ... and level (per-family / per-difficulty pass rates)
    reflects: bool                  # its reasoning checks or redoes a step (nanoseek.sampling.reflection)


@dataclass
class Experience:
    """One step's rollouts: the kept groups' rows for training (G rows per group, contiguous), and
    every sampled row's rewards / length / ending for the metrics (dynamic sampling drops whole groups,
    which would bias accuracy and length if measured on the kept rows only)."""
    prompts: list[list[int]] = field(default_factory=list)
    completions: list[list[int]] = field(default_factory=list)
    logprobs: list[torch.Tensor] = field(default_factory=list)      # kept rows: the sampler's log π of each token
    rewards: list[dict[str, float]] = field(default_factory=list)   # kept rows: each component + "total"
    truncated: list[bool] = field(default_factory=list)             # kept rows: cut at max_new_tokens
    sampled: list[Sample] = field(default_factory=list)              # all rows, G per group, contiguous
    n_groups_sampled: int = 0
    n_groups_zero_var: int = 0
    gen_tokens: int = 0
    gen_time: float = 0.0


def task_families(extra: "Sequence[TaskFamily]" = ()) -> dict[str, TaskFamily]:
    """The built-in task families plus `extra` ones (by name) for one run. Nothing is registered globally:
    the run's problem source and reward function read this mapping."""
    return {**FAMILIES, **{f.name: f for f in extra}}


def _problem_source(cfg: RLConfig, families: dict[str, TaskFamily]):
    """problems(n, seed) -> list[Problem] from the task generators' TRAIN split or a JSONL file."""
    if cfg.tasks.data:
        pool = load_jsonl_problems(cfg.tasks.data)
        if not pool:
            raise UserError(f"tasks.data {cfg.tasks.data} holds no problems; point at a JSONL file with question/answer")
        return lambda n, seed: random.Random(seed).choices(pool, k=n)
    return lambda n, seed: sample_problems(cfg.tasks.names, n, split="train", seed=seed, difficulty=cfg.tasks.difficulty,
                                           families=families)


def _reward_source(cfg: RLConfig, families: dict[str, TaskFamily]):
    """rewards(problems, completion texts, n_tokens) -> [{component: value, "total": weighted sum}] of a batch,
    each problem verified by its family in `families`, plus the user's reward functions (imported here: a bad
    name fails before the run directory is written)."""
    functions = load_reward_functions(cfg.rewards)
    return lambda problems, texts, ns: compute_rewards_batch(cfg.rewards, problems, texts, ns, families=families,
                                                             functions=functions)


def collect(model, tokenizer, cfg: RLConfig, step: int, problems_fn, reward_fn=None, rank: int = 0,
            ranks: int = 1) -> Experience:
    """Generate and score a step's groups; with dynamic sampling, refill dropped groups (bounded rounds).
    problems_fn(n, seed) -> problems; reward_fn(problems, texts, n_tokens) -> reward dicts (default: the rule
    rewards of `cfg.rewards` with the built-in task families). Data parallel: this is rank `rank` of
    `ranks`; it takes every ranks-th of the step's problems and samples (and refills) with seeds of its own."""
    if reward_fn is None:
        reward_fn = lambda problems, texts, ns: compute_rewards_batch(cfg.rewards, problems, texts, ns)  # noqa: E731
    G = cfg.rl.group_size
    want = len(range(rank, cfg.train.prompts, ranks))                 # this rank's share of the prompts
    device = next(model.parameters()).device
    stop = stop_conditions(tokenizer, cfg.sampling.stop)
    other = rank * 1_000_000_007                                      # 0 on one process
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + step + other)
    exp = Experience()
    for rnd in range(1 + (cfg.rl.max_refill if cfg.rl.dynamic_sampling else 0)):
        need = want - len(exp.prompts) // G
        if need <= 0:
            break
        if rnd == 0:                                                  # the step's problems, this rank's share
            wide = math.ceil(cfg.train.prompts * cfg.rl.oversample)    # (oversample: dynamic sampling only)
            problems = problems_fn(wide, cfg.train.seed * 1_000_003 + step * 101)[rank::ranks]
        else:
            problems = problems_fn(need, cfg.train.seed * 1_000_003 + step * 101 + rnd + other)
        prompts = [encode_prompt(tokenizer, p.prompt, cfg.tasks.template, cfg.tasks.system_prompt)
                   for p in problems for _ in range(G)]
        t0 = time.perf_counter()
        with autocast(device, cfg.train.precision):
            g = generate(model, prompts, cfg.sampling, stop, tokenizer.pad_id, gen)
        exp.gen_time += time.perf_counter() - t0
        exp.gen_tokens += int(g.lengths.sum())
        comps = g.completions()
        texts = [response_text(tokenizer, c, cfg.tasks.template) for c in comps]
        rewards = reward_fn([problems[i // G] for i in range(len(texts))], texts, [len(c) for c in comps])
        flat = zero_variance_groups(torch.tensor([r["total"] for r in rewards]), G).tolist()
        exp.n_groups_sampled += len(problems)
        exp.n_groups_zero_var += sum(flat)
        exp.sampled += [Sample(r, len(c), f == "length", problems[i // G].family, problems[i // G].difficulty,
                               reflects(t)) for i, (r, c, f, t) in enumerate(zip(rewards, comps, g.finish, texts))]
        for gi, zero in enumerate(flat):
            if (zero and cfg.rl.dynamic_sampling) or len(exp.prompts) // G >= want:   # flat, or the batch is full
                continue
            rows = range(gi * G, (gi + 1) * G)
            exp.prompts += [prompts[i] for i in rows]
            exp.completions += [comps[i] for i in rows]
            exp.logprobs += [g.logprobs[i, :len(comps[i])] for i in rows]
            exp.rewards += [rewards[i] for i in rows]
            exp.truncated += [g.finish[i] == "length" for i in rows]
    return exp


def make_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device,
               logprobs: "Sequence[torch.Tensor] | None" = None) -> dict:
    """[left-padded prompt | right-padded completion] rows, as the rollout engine laid them out:
    ids/attention_mask/position_ids [N, P+T]; response tokens/mask [N, T] sit at columns P..P+T-1 and are
    predicted by the logits at columns P-1..P+T-2. logprobs: the sampler's log-prob of each completion token
    (one tensor per row), laid out as "sample_logp" [N, T] fp32 beside the tokens, 0 where they are padded."""
    p_ids, p_mask = left_pad(prompts, pad_id)
    T = max(len(c) for c in completions)
    c_ids = torch.full((len(completions), T), pad_id, dtype=torch.long)
    c_mask = torch.zeros((len(completions), T), dtype=torch.long)
    for i, c in enumerate(completions):
        c_ids[i, :len(c)] = torch.tensor(c)
        c_mask[i, :len(c)] = 1
    mask = torch.cat([p_mask, c_mask], 1)
    batch = {"ids": torch.cat([p_ids, c_ids], 1).to(device), "mask": mask.to(device),
             "pos": (mask.cumsum(-1) - 1).clamp(min=0).to(device), "tokens": c_ids.to(device),
             "resp_mask": c_mask.to(device), "P": p_ids.shape[1], "lengths": c_mask.sum(1).to(device)}
    if logprobs is not None:
        sample_logp = torch.zeros((len(completions), T), dtype=torch.float32, device=device)
        for i, lp in enumerate(logprobs):
            sample_logp[i, :len(lp)] = lp
        batch["sample_logp"] = sample_logp
    return batch


def _response_logits(model, batch: dict, rows: slice, precision: str) -> torch.Tensor:
    """Logits [n, T, V] that predict the response tokens of `rows`."""
    with autocast(batch["ids"].device, precision):
        out = model(batch["ids"][rows], position_ids=batch["pos"][rows], attention_mask=batch["mask"][rows])
    return out.logits[:, response_slice(batch)]


# plots/<name>.png: one figure per entry, one axis per (title, keys) pair; each key is a regular expression
# matched against the whole of each logged key, so one entry draws every family or difficulty a run logged.
PLOT_PANELS: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "reward": [("reward", ("reward/total", "reward/accuracy", "reward/format"))],
    "accuracy": [("accuracy: rollouts, held-out eval", ("accuracy", "eval/pass@1", "eval/format")),
                 ("rollout accuracy per task family", (r"accuracy/(?!d\d+$).+",)),
                 ("rollout accuracy per difficulty", (r"accuracy/d\d+",))],
    "response_length": [("response length (tokens)", ("response_length", "response_length/correct",
                                                       "response_length/wrong", "eval/length")),
                        ("truncated share", ("truncated_share",))],
    "reflection": [("reflection rate (checks or redoes a step)", ("reflection", "eval/reflection"))],
    "entropy_kl": [("entropy (nats / token)", ("entropy",)), ("KL to the reference (k3)", ("kl",))],
    "zero_variance": [("groups without reward variance", ("zero_var_share", "zero_var/all_wrong",
                                                          "zero_var/all_right"))],
    "optimizer": [("clip fraction", ("clip_frac", "clip_frac/low", "clip_frac/high")),
                  ("gradient norm (before clipping)", ("grad_norm",)), ("learning rate", ("lr",))],
}


def write_plots(run_dir: Path, records: list[dict]) -> None:
    """plots/<name>.png over steps for each figure of `PLOT_PANELS` (eval points drawn with markers); an
    axis with nothing logged stays empty (e.g. KL at β = 0)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float)) and k != "step"})
    for name, axes_spec in PLOT_PANELS.items():
        fig, axes = plt.subplots(1, len(axes_spec), figsize=(6 * len(axes_spec), 3.5), squeeze=False)
        for ax, (title, patterns) in zip(axes[0], axes_spec):
            for k in (k for p in patterns for k in logged if re.fullmatch(p, k)):
                pts = [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))]
                if pts:
                    ax.plot(*zip(*pts), marker="o" if k.startswith("eval/") else None, markersize=3, label=k)
            ax.set_xlabel("step")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(run_dir / "plots" / f"{name}.png", buf.getvalue())


def eval_settings(cfg: RLConfig) -> RLEvalConfig:
    """cfg.eval as evaluation reads it: the run's stop strings and (unless eval.template is set) its template."""
    return dataclasses.replace(cfg.eval, template=cfg.eval.template or cfg.tasks.template,
                               sampling=dataclasses.replace(cfg.eval.sampling, stop=list(cfg.sampling.stop)))


def eval_problems(cfg: RLConfig) -> list:
    """The held-out problems of evaluation during RL: eval.data's, else the TEST split of the rule-verified
    training families; none when the run trains on tasks.data without an eval.data (its families' test split
    says nothing about the user's problems)."""
    ec = cfg.eval
    if not ec.problems:
        return []
    if ec.data:
        return load_problems([], ec.data, ec.problems, "test", ec.seed)
    if cfg.tasks.data:
        return []
    return sample_problems([n for n in cfg.tasks.names if n in FAMILIES], ec.problems, split="test", seed=ec.seed,
                           difficulty=cfg.tasks.difficulty)


def _check_prompts(model, tokenizer, problems: list, template: str, system: str, budget: int, what: str) -> None:
    """Encode the problems' prompts now, as the run will (a bad template or chat template fails here, before the
    run directory is written) and check the longest plus `budget` new tokens fits the model's positions."""
    longest = max(len(encode_prompt(tokenizer, p.prompt, template, system)) for p in problems)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and longest + budget > max_pos:
        raise UserError(f"{what} prompts reach {longest} tokens + {budget} new tokens > the model's "
                        f"max_position_embeddings={max_pos}; lower the max_new_tokens or use shorter problems")


def _eval_record(model, tokenizer, problems, cfg: RLConfig, run_dir: Path, step: int) -> dict:
    with autocast(next(model.parameters()).device, cfg.train.precision):
        # seeded by cfg.eval.seed, global RNG untouched; judged by the training reward's answer format
        res = evaluate(model, tokenizer, problems, eval_settings(cfg), rewards=cfg.rewards,
                       system_prompt=cfg.tasks.system_prompt)
    atomic_write_json(run_dir / "eval" / f"step-{step}.json", res)
    K = res["samples"]
    rec = {"eval/pass@1": res["pass@1"]["mean"], f"eval/cons@{K}": res[f"cons@{K}"]["mean"],
           "eval/format": res["format"]["mean"], "eval/reflection": res["reflection"]["mean"],
           "eval/length": res["length"]["mean"]}
    if "greedy" in res:
        rec["eval/greedy"] = res["greedy"]["mean"]
    rec["eval/completions"] = completion_records(res)          # a few judged samples, as TRL's log_completions
    return rec


def train_rl(cfg: RLConfig, run_dir: str | Path, algo: str = "grpo", resume: bool = False, progress: bool = True,
             families: Sequence[TaskFamily] = ()) -> torch.nn.Module:
    """Run GRPO (algo="grpo") or the PPO baseline (algo="ppo") from `cfg.train.init` into `run_dir`.

    families: task families beyond the built-in ones that `cfg.tasks.names` may name (R1 stage 4's general
    prompts scored by a reward model), passed to this run's problem source and reward function only.

    Each step reads top to bottom: collect (rollouts and their rewards) → advantages (the GRPO or PPO
    estimator) → update (μ epochs of the clipped policy objective, then PPO's critic) → metrics,
    evaluation, checkpoint."""
    tc, rc = cfg.train, cfg.rl
    if algo not in ("grpo", "ppo"):
        raise ValueError(algo)
    if not tc.init:
        raise UserError(f"{algo} needs a model to start from: pass --init MODEL_DIR (e.g. runs/base/final) "
                        f"or set train.init in the recipe")
    if cfg.rewards.starts_in_think:
        raise UserError("rewards.starts_in_think must stay false here: the trainer already puts the template's "
                        "opening <think> back in front of each completion before scoring")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    run_dir = Path(run_dir)
    device = resolve_device(tc.device)
    ctx, device = join_ranks(cfg.parallel, tc, device)
    if ctx is not None:
        pc = ctx.cfg
        if algo != "grpo" or pc.pp > 1 or pc.ep > 1 or pc.dp_mode == "fsdp":
            raise UserError(f"{algo} under torchrun: only grpo runs data parallel, with the policy replicated for "
                            "rollouts; set parallel.dp_mode=\"ddp\" (or \"hfreduce\") and parallel.ep=1, parallel.pp=1")
    if cfg.lora.enabled and (algo != "grpo" or ctx is not None):
        raise UserError(f"lora adapters train in one-process grpo runs, not {algo}{' under torchrun' if ctx else ''}; "
                        "set lora.r=0")
    main = ctx is None or ctx.is_main
    model, tok_dir = load_init(tc.init, device)
    tokenizer = Tokenizer.load(tok_dir)
    ckpt = check_run_dir(run_dir, cfg, resume)
    tasks = task_families(families)                           # a bad tasks.data fails before the run dir exists
    problems_fn, reward_fn = _problem_source(cfg, tasks), _reward_source(cfg, tasks)
    reference = None
    if rc.beta > 0 and not cfg.lora.enabled:                  # the k3 KL to the initial model; none at β = 0
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    if ckpt is not None and not cfg.lora.enabled:
        model = load_pretrained(ckpt, device=str(device))
    model = compile_for_training(model.float().eval().requires_grad_(True), tc.compile, device, dynamic=None)
    set_activation_checkpointing(model, tc.activation_checkpointing)
    if cfg.lora.enabled:                                      # adapters only; the frozen base is --init
        apply_lora(model, cfg.lora, tc.seed)
        if ckpt is not None:
            resume_adapter(model, ckpt)
        reference = BaseModel(model) if rc.beta > 0 else None  # the initial model is the base: no copy
    critic = PPO(cfg.ppo, model, cfg.optim, rc.mu, tc.precision) if algo == "ppo" else None   # (state: below)
    # everything else a step or an evaluation reads is checked before the run directory is written too
    stop_conditions(tokenizer, cfg.sampling.stop)
    _check_prompts(model, tokenizer, problems_fn(cfg.train.prompts, cfg.train.seed), cfg.tasks.template,
                   cfg.tasks.system_prompt, cfg.sampling.max_new_tokens, "training")
    test_problems = eval_problems(cfg) if main else []
    if test_problems:
        _check_prompts(model, tokenizer, test_problems, eval_settings(cfg).template, cfg.tasks.system_prompt,
                       cfg.eval.sampling.max_new_tokens, "eval")
    with rank0_first(ctx):
        if main:
            start_run(run_dir, cfg, tokenizer)
    # replicated under torchrun (only adds gradient averaging); a world of size 1 otherwise
    par = parallelize(model, ctx=ctx) if ctx is not None else Parallel.single(model)
    estimator = critic or GRPO(cfg.grpo, rc.group_size, par.ctx)
    optimizer = build_optimizer(model, cfg.optim)
    start = 0
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        estimator.load_state_dict(state)
        start = int(state["step"])
    G = rc.group_size

    logger = MetricsLogger(run_dir, tc.steps, start, description=algo, progress=progress,
                           show=("reward/total", "accuracy", "response_length", "eval/pass@1")) if main else NullLogger()
    with logger as log:
        if start == 0 and test_problems and cfg.eval.at_start and main:
            log.log(0, _eval_record(model, tokenizer, test_problems, cfg, run_dir, 0))
        for step in steps_with_gc(range(start, tc.steps)):
            t_step = time.perf_counter()
            lr = wsd_lr(step, tc.steps, cfg.optim)
            set_lr(optimizer, lr)

            # 1. collect: this rank's groups of completions and their rewards
            exp = collect(model, tokenizer, cfg, step, problems_fn, reward_fn, par.ctx.dp_rank, par.ctx.cfg.dp)
            rec, n_kept = _rollout_metrics(exp, G, par.ctx)        # over every rank's rollouts
            if n_kept == 0:                                   # every group was flat, even after refills
                rec.update(lr=lr, step_time=time.perf_counter() - t_step)
                log.log(step + 1, rec)
                continue
            t_train = time.perf_counter()
            N = len(exp.prompts)                              # (a data-parallel rank may have no groups)
            batch = make_batch(exp.prompts, exp.completions, tokenizer.pad_id, device, exp.logprobs) if N else None
            if rc.mask_truncated_completions and N:           # TRL's knob: no loss on completions cut by length
                batch["resp_mask"] = batch["resp_mask"] * ~torch.tensor(exp.truncated, device=device)[:, None]
            chunks = [slice(i, min(i + tc.micro_batch, N)) for i in range(0, N, tc.micro_batch)]
            counts = StepCounts.of(batch, n_kept, par.ctx)

            # 2. advantages: GRPO's group-relative ones, or PPO's GAE over its critic
            rewards = torch.tensor([r["total"] for r in exp.rewards], device=device, dtype=torch.float32)
            adv = estimator.advantages(batch, rewards, chunks)

            # 3. update: μ epochs of the clipped policy objective, then PPO's critic on the same batch
            metrics, grad_norm = update_policy(model, optimizer, par, reference, batch, chunks, adv, counts, cfg)
            rec.update(metrics)
            rec.update(estimator.update(batch, chunks, lr / cfg.optim.lr))
            if reference is None:
                rec.pop("kl")
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_time = time.perf_counter() - t_train
            rec.update(lr=lr, grad_norm=float(grad_norm),
                       train_tokens_per_s=counts.tokens * rc.mu / max(train_time, 1e-9),
                       step_time=time.perf_counter() - t_step)

            done = step + 1
            if main and test_problems and (done == tc.steps or (cfg.eval.every and done % cfg.eval.every == 0)):
                rec.update(_eval_record(model, tokenizer, test_problems, cfg, run_dir, done))
            log.log(done, rec)
            if main and (done == tc.steps or cfg.checkpoint.due(done, tc.steps)):
                write_plots(run_dir, read_jsonl(log.path))
            if main and cfg.checkpoint.due(done, tc.steps):
                save_checkpoint(run_dir, done, model, {"optimizer": optimizer.state_dict(), **estimator.state_dict()},
                                cfg.checkpoint.keep_last)
    if main:
        model = finish_lora(model, run_dir, tc.init)          # LoRA: adapter/ in PEFT's format, merged final/
        export_final(run_dir, model, tokenizer, checkpoint_dtype(tc.init))
    return model


@dataclass
class StepCounts:
    """The step's loss normalisers. The policy loss of a rank's rows is divided by the WHOLE step's sequences
    and response tokens (over every rank) ÷ dp, since the gradient average divides by dp again; metrics are
    token shares of `resp_tokens`, the step's response tokens."""
    seqs: float                     # sequences per rank: all ranks' kept rows / dp
    resp_tokens_per_rank: float     # response tokens per rank: all ranks' / dp
    resp_tokens: float              # all ranks' response tokens
    tokens: float                   # all ranks' prompt + response tokens (throughput)

    @classmethod
    def of(cls, batch: dict | None, n_kept: int, ctx) -> "StepCounts":
        mine = [float(batch["resp_mask"].sum()), float(batch["mask"].sum())] if batch is not None else [0.0, 0.0]
        t = ctx.all_reduce(torch.tensor(mine, dtype=torch.float64), "sum", "dp")
        dp = ctx.cfg.dp
        resp = max(float(t[0]), 1.0)                 # 0 when rl.mask_truncated_completions masked every row
        return cls(seqs=n_kept / dp, resp_tokens_per_rank=resp / dp, resp_tokens=resp, tokens=float(t[1]))


def update_policy(model, optimizer, par, reference, batch: dict | None, chunks: list[slice], adv, counts: StepCounts,
                  cfg: RLConfig) -> tuple[dict, float]:
    """μ AdamW steps on the clipped objective (+ β·k3 KL to `reference`) over the step's rows, in micro-batch
    chunks whose gradients accumulate. Epoch 0 runs at θ = θ_old, so its log-probs ARE the old log-probs:
    kept instead of a separate forward, and they are what the sampler's log-probs (`batch["sample_logp"]`,
    when present) are compared with: "rollout/logprob_gap" is the mean |log π_old − log π_sampler| over the
    step's response tokens, and with `rl.tis_cap` > 0 each token's policy-gradient term is weighted by
    min(π_old / π_sampler, cap) (nanoseek.rl.tis), fixed across the μ epochs as TRL does. Returns (metrics
    as the step's token means over every rank, the last epoch's gradient norm)."""
    rc, precision = cfg.rl, cfg.train.precision
    ranks = par.ctx.cfg.dp
    mask = batch["resp_mask"] if batch is not None else None
    dev = batch["ids"].device if batch is not None else torch.device("cpu")
    fused = compile_enabled(cfg.train.compile, dev)      # the log-prob and entropy arithmetic compiled (chunked_ce)
    ref_logp = None
    if reference is not None and batch is not None:
        with torch.no_grad():
            ref_logp = torch.cat([token_logprobs(_response_logits(reference, batch, c, precision), batch["tokens"][c],
                                                 compiled=fused) for c in chunks])
    sample_logp = batch.get("sample_logp") if batch is not None else None
    old_logp: list[torch.Tensor] = []
    weights: list[torch.Tensor | None] = []
    # the step's metrics are summed on the device and read once at the end: a host read per micro-batch would
    # stall the launches of the next one (65 reads, 119 ms of a 0.5B model's update on an H200)
    sums = {k: torch.zeros((), dtype=torch.float64, device=dev) for k in (
        "loss", "clip_frac", "clip_frac/low", "clip_frac/high", "entropy", "kl", "rollout/logprob_gap")}
    for it in range(rc.mu):
        for ci, c in enumerate(chunks):
            logits = _response_logits(model, batch, c, precision)
            logp = token_logprobs(logits, batch["tokens"][c], compiled=fused)
            if it == 0:                                        # θ = θ_old here: these ARE the old log-probs
                old_logp.append(logp.detach())
                ent = token_entropy(logits.detach(), compiled=fused)
                sums["entropy"] += (ent * mask[c]).sum() / counts.resp_tokens
                if sample_logp is not None:                    # the chunk's mean gap × its share of the tokens
                    gap = logprob_gap(old_logp[ci], sample_logp[c], mask[c])
                    sums["rollout/logprob_gap"] += gap * mask[c].sum() / counts.resp_tokens
                weights.append(tis_weights(old_logp[ci], sample_logp[c], rc.tis_cap)
                               if rc.tis_cap > 0 and sample_logp is not None else None)
            loss, stats = policy_loss(
                logp, old_logp[ci], adv[c], mask[c], eps_low=rc.eps_low, eps_high=rc.eps_high,
                beta=rc.beta, ref_logp=None if ref_logp is None else ref_logp[c], aggregation=rc.aggregation,
                max_len=cfg.sampling.max_new_tokens, n_seqs=counts.seqs, n_tokens=counts.resp_tokens_per_rank,
                weight=weights[ci], level=rc.importance_sampling_level)
            for r in par.reducers:
                r.armed = ci == len(chunks) - 1               # average while the last chunk's backward runs
            loss.backward()
            share = mask[c].sum() / counts.resp_tokens / rc.mu
            sums["loss"] += loss.detach() / (rc.mu * ranks)
            sums["clip_frac"] += stats["clip_frac"] * share
            sums["clip_frac/low"] += stats["clip_low"] * share
            sums["clip_frac/high"] += stats["clip_high"] * share
            if "kl" in stats:
                sums["kl"] += stats["kl"] * share
        par.finish_grads()                                     # every rank, even one without rollouts
        grad_norm = par.clip_grad_norm_(cfg.optim.grad_clip or math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    keys = tuple(sums)                                        # each rank summed its share of the global means
    t = par.ctx.all_reduce(torch.stack([sums[k] for k in keys]).cpu(), "sum", "dp")
    metrics = dict(zip(keys, t.tolist()))
    if batch is not None and sample_logp is None:             # no sampler log-probs were given: no gap to report
        metrics.pop("rollout/logprob_gap")
    return metrics, grad_norm


def _nanmean(values: list[float]) -> float | None:
    """Mean of the values that are not NaN (a user reward function's None), None if there are none."""
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def _rollout_metrics(exp: Experience, G: int, ctx) -> tuple[dict, int]:
    """(means over every completion sampled this step on every dp rank, refill rounds included; the kept rows
    of all ranks). Generation throughput is all ranks' tokens over the slowest rank's time.

    The diagnostics of why RL does or does not learn (README "RL metrics"): "accuracy/<family>" and
    "accuracy/d<level>" (pass rates per task family and difficulty), "zero_var/all_wrong" / "zero_var/all_right"
    (shares of ALL groups that carry no reward variance because no / every completion was correct: too hard /
    too easy; with "zero_var_share" the remainder are flat on another reward), "reflection" (share of
    completions whose reasoning checks or redoes a step), and response length of correct / wrong completions."""
    mine = (exp.sampled, exp.n_groups_sampled, exp.n_groups_zero_var, exp.gen_tokens, exp.gen_time, len(exp.prompts))
    everyone = [mine]
    if ctx.distributed:
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
    sampled = [s for e in everyone for s in e[0]]      # whole groups of G rows, rank after rank
    kept = sum(e[5] for e in everyone)
    n = len(sampled)
    correct = [s.rewards["accuracy"] >= 1.0 for s in sampled]
    rec = {f"reward/{k}": _nanmean([s.rewards[k] for s in sampled]) for k in sampled[0].rewards}
    rec["accuracy"] = sum(correct) / n
    for prefix, of in (("accuracy/", lambda s: s.family), ("accuracy/d", lambda s: s.difficulty)):
        groups: dict = {}
        for s, c in zip(sampled, correct):
            groups.setdefault(of(s), []).append(c)
        rec.update({f"{prefix}{v}": sum(cs) / len(cs) for v, cs in sorted(groups.items())})
    rec["response_length"] = sum(s.length for s in sampled) / n
    for name, want in (("correct", True), ("wrong", False)):
        lengths = [s.length for s, c in zip(sampled, correct) if c == want]
        if lengths:
            rec[f"response_length/{name}"] = sum(lengths) / len(lengths)
    rec["truncated_share"] = sum(s.truncated for s in sampled) / n
    rec["reflection"] = sum(s.reflects for s in sampled) / n
    rec["zero_var_share"] = sum(e[2] for e in everyone) / max(sum(e[1] for e in everyone), 1)
    flat = zero_variance_groups(torch.tensor([s.rewards["total"] for s in sampled]), G).tolist()
    hits = [sum(correct[g * G:(g + 1) * G]) for g in range(len(flat))]
    rec["zero_var/all_wrong"] = sum(f and h == 0 for f, h in zip(flat, hits)) / len(flat)
    rec["zero_var/all_right"] = sum(f and h == G for f, h in zip(flat, hits)) / len(flat)
    rec["groups"] = kept // G
    rec["gen_tokens_per_s"] = sum(e[3] for e in everyone) / max(max(e[4] for e in everyone), 1e-9)
    return rec, kept
