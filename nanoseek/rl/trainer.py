"""The RL loop: rollouts → rule rewards → GRPO (or PPO) updates, with metrics, plots and checkpoints.

One step (DeepSeekMath Alg. 1, outcome supervision; R1 report §2.2):

    sample `prompts` problems; generate `group_size` completions each with the current policy (π_old)
    score each completion with the rule rewards (accuracy, format, ...)            nanoseek.rl.rewards
    [DAPO dynamic sampling: drop groups whose rewards are all equal, sample more prompts, bounded rounds]
    GRPO: Â = group-relative advantage per completion                            nanoseek.rl.grpo
    PPO:  Â_t = GAE over a learned critic's values                                nanoseek.rl.ppo
    μ times: one AdamW step on the clipped objective (+ β·KL to the frozen initial model)

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
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoseek.errors import UserError
from nanoseek.eval import EvalConfig, evaluate
from nanoseek.files import atomic_write_bytes, atomic_write_json, read_jsonl
from nanoseek.parallel import ParallelConfig
from nanoseek.rl.grpo import GRPOConfig, group_advantages, policy_loss, token_entropy, token_logprobs, zero_variance_groups
from nanoseek.rl.ppo import PPOConfig, ValueModel, gae, terminal_rewards, value_loss, whiten
from nanoseek.rl.rewards import RewardConfig, compute_rewards
from nanoseek.rl.rollout import SamplingConfig, encode_prompt, generate, left_pad, response_text, stop_token_ids
from nanoseek.train.checkpoint import load_trainer_state, save_checkpoint
from nanoseek.train.logger import MetricsLogger
from nanoseek.train.optim import OptimConfig, build_optimizer, set_lr, wsd_lr
from nanoseek.train.trainer import CheckpointConfig, NullLogger, autocast, resolve_device


@dataclass
class RLTrainConfig:
    steps: int = 100
    prompts: int = 16               # prompts per step; each is sampled grpo.group_size times
    micro_batch: int = 64           # rows per forward/backward (gradients accumulate over a step)
    init: str = ""                  # model directory to start from; also the frozen KL reference
    device: str = "auto"
    precision: str = "fp32"         # "fp32" | "bf16" (autocast)
    seed: int = 0
    threads: int = 0                # torch CPU threads; 0 = torch's default


@dataclass
class TaskConfig:
    names: list[str] = field(default_factory=lambda: ["arithmetic"])   # task families (nanoseek.tasks)
    difficulty: int | dict | None = None  # one level, or {family: level}; None = each family's default mix
    data: str = ""                  # a JSONL file of training problems instead of generated ones
    template: str = "r1_zero"       # prompt format for training rollouts: "r1_zero" | "chat" | "plain"


@dataclass
class RLEvalConfig(EvalConfig):
    every: int = 25                 # evaluate every N steps and after the last; 0 = only after the last
    problems: int = 64              # held-out TEST-split problems of the training tasks (0 = no eval)
    at_start: bool = True           # also evaluate the initial model, logged as step 0
    samples: int = 4


@dataclass
class RLConfig:
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    tasks: TaskConfig = field(default_factory=TaskConfig)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(max_new_tokens=64))
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=5, decay_frac=0.0,
                                                                   min_lr_ratio=1.0, weight_decay=0.0))
    eval: RLEvalConfig = field(default_factory=RLEvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=50, keep_last=2))
    parallel: ParallelConfig = field(default_factory=lambda: ParallelConfig(dp_mode="ddp"))   # under torchrun


@dataclass
class Experience:
    """One step's rollouts: the kept groups' rows for training (G rows per group, contiguous), and
    every sampled row's rewards / length / ending for the metrics (dynamic sampling drops whole groups,
    which would bias accuracy and length if measured on the kept rows only)."""
    prompts: list[list[int]] = field(default_factory=list)
    completions: list[list[int]] = field(default_factory=list)
    rewards: list[dict[str, float]] = field(default_factory=list)   # kept rows: each component + "total"
    sampled: list[tuple[dict, int, bool]] = field(default_factory=list)  # all rows: (rewards, length, truncated)
    n_groups_sampled: int = 0
    n_groups_zero_var: int = 0
    gen_tokens: int = 0
    gen_time: float = 0.0


def _problem_source(cfg: RLConfig):
    """problems(n, seed) -> list[Problem] from the task generators' TRAIN split or a JSONL file."""
    if cfg.tasks.data:
        from nanoseek.tasks.jsonl import load_jsonl_problems
        pool = load_jsonl_problems(cfg.tasks.data)
        if not pool:
            raise UserError(f"tasks.data {cfg.tasks.data} holds no problems; point at a JSONL file with question/answer")
        return lambda n, seed: random.Random(seed).choices(pool, k=n)
    from nanoseek.tasks import sample_problems
    return lambda n, seed: sample_problems(cfg.tasks.names, n, split="train", seed=seed, difficulty=cfg.tasks.difficulty)


def collect(model, tokenizer, cfg: RLConfig, step: int, problems_fn, rank: int = 0, ranks: int = 1) -> Experience:
    """Generate and score a step's groups; with dynamic sampling, refill dropped groups (bounded rounds).
    Data parallel: this is rank `rank` of `ranks`; it takes every ranks-th of the step's problems and
    samples (and refills) with seeds of its own."""
    G = cfg.grpo.group_size
    want = len(range(rank, cfg.train.prompts, ranks))                 # this rank's share of the prompts
    device = next(model.parameters()).device
    stop = stop_token_ids(tokenizer, cfg.sampling.stop)
    other = rank * 1_000_000_007                                      # 0 on one process
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + step + other)
    exp = Experience()
    for rnd in range(1 + (cfg.grpo.max_refill if cfg.grpo.dynamic_sampling else 0)):
        need = want - len(exp.prompts) // G
        if need <= 0:
            break
        if rnd == 0:                                                  # the step's problems, this rank's share
            problems = problems_fn(cfg.train.prompts, cfg.train.seed * 1_000_003 + step * 101)[rank::ranks]
        else:
            problems = problems_fn(need, cfg.train.seed * 1_000_003 + step * 101 + rnd + other)
        prompts = [encode_prompt(tokenizer, p.prompt, cfg.tasks.template) for p in problems for _ in range(G)]
        t0 = time.perf_counter()
        with autocast(device, cfg.train.precision):
            g = generate(model, prompts, cfg.sampling, stop, tokenizer.pad_id, gen)
        exp.gen_time += time.perf_counter() - t0
        exp.gen_tokens += int(g.lengths.sum())
        comps = g.completions()
        rewards = [compute_rewards(cfg.rewards, problems[i // G], response_text(tokenizer, c, cfg.tasks.template), len(c))
                   for i, c in enumerate(comps)]
        flat = zero_variance_groups(torch.tensor([r["total"] for r in rewards]), G).tolist()
        exp.n_groups_sampled += len(problems)
        exp.n_groups_zero_var += sum(flat)
        exp.sampled += [(r, len(c), f == "length") for r, c, f in zip(rewards, comps, g.finish)]
        for gi, zero in enumerate(flat):
            if zero and cfg.grpo.dynamic_sampling:
                continue
            rows = range(gi * G, (gi + 1) * G)
            exp.prompts += [prompts[i] for i in rows]
            exp.completions += [comps[i] for i in rows]
            exp.rewards += [rewards[i] for i in rows]
    return exp


def make_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device) -> dict:
    """[left-padded prompt | right-padded completion] rows, as the rollout engine laid them out:
    ids/attention_mask/position_ids [N, P+T]; response tokens/mask [N, T] sit at columns P..P+T-1 and are
    predicted by the logits at columns P-1..P+T-2."""
    p_ids, p_mask = left_pad(prompts, pad_id)
    T = max(len(c) for c in completions)
    c_ids = torch.full((len(completions), T), pad_id, dtype=torch.long)
    c_mask = torch.zeros((len(completions), T), dtype=torch.long)
    for i, c in enumerate(completions):
        c_ids[i, :len(c)] = torch.tensor(c)
        c_mask[i, :len(c)] = 1
    mask = torch.cat([p_mask, c_mask], 1)
    return {"ids": torch.cat([p_ids, c_ids], 1).to(device), "mask": mask.to(device),
            "pos": (mask.cumsum(-1) - 1).clamp(min=0).to(device), "tokens": c_ids.to(device),
            "resp_mask": c_mask.to(device), "P": p_ids.shape[1], "lengths": c_mask.sum(1).to(device)}


def _response_logits(model, batch: dict, rows: slice, precision: str) -> torch.Tensor:
    """Logits [n, T, V] that predict the response tokens of `rows`."""
    P, T = batch["P"], batch["tokens"].shape[1]
    device = batch["ids"].device
    with autocast(device, precision):
        out = model(batch["ids"][rows], position_ids=batch["pos"][rows], attention_mask=batch["mask"][rows])
    return out.logits[:, P - 1:P - 1 + T]


def _response_values(value_model, batch: dict, rows: slice, precision: str) -> torch.Tensor:
    P, T = batch["P"], batch["tokens"].shape[1]
    with autocast(batch["ids"].device, precision):
        v = value_model(batch["ids"][rows], position_ids=batch["pos"][rows], attention_mask=batch["mask"][rows])
    return v[:, P - 1:P - 1 + T].float()


def write_plots(run_dir: Path, records: list[dict]) -> None:
    """plots/{reward,accuracy,response_length}.png over steps (eval pass@1 joins the accuracy plot)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {"reward": ["reward/total", "reward/accuracy", "reward/format"],
              "accuracy": ["accuracy", "eval/pass@1", "eval/format"],
              "response_length": ["response_length"]}
    for name, keys in panels.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for k in keys:
            pts = [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))]
            if pts:
                ax.plot(*zip(*pts), marker="o" if k.startswith("eval/") else None, markersize=3, label=k)
        ax.set_xlabel("step")
        ax.set_title(name.replace("_", " "))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        atomic_write_bytes(run_dir / "plots" / f"{name}.png", buf.getvalue())


def _eval_record(model, tokenizer, problems, cfg: RLConfig, run_dir: Path, step: int) -> dict:
    with autocast(next(model.parameters()).device, cfg.train.precision):
        res = evaluate(model, tokenizer, problems, cfg.eval)    # seeded by cfg.eval.seed, global RNG untouched
    atomic_write_json(run_dir / "eval" / f"step-{step}.json", res)
    K = res["samples"]
    rec = {"eval/pass@1": res["pass@1"]["mean"], f"eval/cons@{K}": res[f"cons@{K}"]["mean"],
           "eval/format": res["format"]["mean"], "eval/length": res["length"]["mean"]}
    if "greedy" in res:
        rec["eval/greedy"] = res["greedy"]["mean"]
    return rec


def train_rl(cfg: RLConfig, run_dir: str | Path, algo: str = "grpo", resume: bool = False,
             progress: bool = True) -> torch.nn.Module:
    """Run GRPO (algo="grpo") or the PPO baseline (algo="ppo") from `cfg.train.init` into `run_dir`."""
    from nanoseek.hf import load_pretrained
    from nanoseek.tokenizer import Tokenizer
    from nanoseek.train.commands import check_run_dir, export_final, join_ranks, load_init, rank0_first, start_run

    tc, gc = cfg.train, cfg.grpo
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
    main = ctx is None or ctx.is_main
    model, tok_dir = load_init(tc.init, device)
    tokenizer = Tokenizer.load(tok_dir)
    ckpt = check_run_dir(run_dir, cfg, resume)
    problems_fn = _problem_source(cfg)                        # a bad tasks.data fails before the run dir exists
    reference = None
    if gc.beta > 0:                                           # the k3 KL to the initial model; none at β = 0
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    if ckpt is not None:
        model = load_pretrained(ckpt, device=str(device))
    model = model.float().eval().requires_grad_(True)
    value_model = ValueModel(model) if algo == "ppo" else None   # (its state is restored below on resume)
    with rank0_first(ctx):
        if main:
            start_run(run_dir, cfg, tokenizer)
    par = None
    if ctx is not None:
        from nanoseek.parallel import parallelize
        par = parallelize(model, ctx=ctx)                         # replicated: only adds gradient averaging
    rank, ranks = (0, 1) if ctx is None else (ctx.dp_rank, ctx.cfg.dp)
    optimizer = build_optimizer(model, cfg.optim)
    value_opt = build_optimizer(value_model, dataclasses.replace(cfg.optim, lr=cfg.ppo.value_lr)) if value_model else None
    start = 0
    if ckpt is not None:
        state = load_trainer_state(ckpt)
        optimizer.load_state_dict(state["optimizer"])
        if value_model is not None:
            value_model.load_state_dict(state["value_model"])
            value_opt.load_state_dict(state["value_optimizer"])
        start = int(state["step"])
    eval_problems = []
    if cfg.eval.problems:
        from nanoseek.tasks import sample_problems
        eval_problems = sample_problems(cfg.tasks.names, cfg.eval.problems, split="test", seed=cfg.eval.seed,
                                        difficulty=cfg.tasks.difficulty)
    G, micro = gc.group_size, tc.micro_batch

    logger = MetricsLogger(run_dir, tc.steps, start, description=algo, progress=progress,
                           show=("reward/total", "accuracy", "response_length", "eval/pass@1")) if main else NullLogger()
    with logger as log:
        if start == 0 and eval_problems and cfg.eval.at_start and main:
            log.log(0, _eval_record(model, tokenizer, eval_problems, cfg, run_dir, 0))
        for step in range(start, tc.steps):
            t_step = time.perf_counter()
            lr = wsd_lr(step, tc.steps, cfg.optim)
            set_lr(optimizer, lr)
            exp = collect(model, tokenizer, cfg, step, problems_fn, rank, ranks)
            N = len(exp.prompts)
            if par is None:
                rec = _rollout_metrics(exp, G)
                N_all = N
            else:                                             # every rank's rollouts in the metrics
                rec, N_all = _gathered_rollout_metrics(exp, G)
            if N_all == 0:                                    # every group was flat, even after refills
                rec.update(lr=lr, step_time=time.perf_counter() - t_step)
                log.log(step + 1, rec)
                continue
            t_train = time.perf_counter()
            chunks = [slice(i, min(i + micro, N)) for i in range(0, N, micro)]
            mask = n_tok = None
            if N:                                             # (a data-parallel rank may have no groups)
                batch = make_batch(exp.prompts, exp.completions, tokenizer.pad_id, device)
                total = torch.tensor([r["total"] for r in exp.rewards], device=device, dtype=torch.float32)
                mask, n_tok = batch["resp_mask"], float(batch["resp_mask"].sum())
            # loss normalisers: the whole step's sequences / tokens, ÷ dp as the gradient average divides by dp
            n_seqs, n_norm, n_tok_all, tokens = N, n_tok, n_tok, float(batch["mask"].sum()) if N else 0.0
            if par is not None:
                counts = torch.tensor([n_tok or 0.0, tokens], dtype=torch.float64)
                ctx.all_reduce(counts, "sum", "dp")
                n_tok_all, tokens = float(counts[0]), float(counts[1])
                n_seqs, n_norm = N_all / ranks, n_tok_all / ranks
            ref_logp = None
            if reference is not None and N:
                with torch.no_grad():
                    ref_logp = torch.cat([token_logprobs(_response_logits(reference, batch, c, tc.precision),
                                                         batch["tokens"][c]) for c in chunks])
            if algo == "grpo" and par is not None and gc.scaling == "batch":   # std over every rank's rewards
                everyone = [None] * ranks
                torch.distributed.all_gather_object(everyone, [r["total"] for r in exp.rewards], group=ctx.dp_group)
                offset = sum(len(x) for x in everyone[:rank])
                adv = group_advantages(torch.tensor([t for x in everyone for t in x], device=device), G, gc.scaling,
                                       gc.adv_eps)[offset:offset + N]
            elif algo == "grpo" and N:
                adv = group_advantages(total, G, gc.scaling, gc.adv_eps)                  # [N]
            elif algo == "ppo":
                with torch.no_grad():
                    old_values = torch.cat([_response_values(value_model, batch, c, tc.precision) for c in chunks])
                adv, returns = gae(terminal_rewards(total, batch["lengths"], mask.shape[1]), old_values, mask,
                                   cfg.ppo.gamma, cfg.ppo.lam)                             # [N, T]
                if cfg.ppo.whiten:
                    adv = whiten(adv, mask)
            old_logp: list[torch.Tensor] = []
            sums = {"loss": 0.0, "clip_frac": 0.0, "entropy": 0.0, "kl": 0.0, "value_loss": 0.0}
            for it in range(gc.mu):
                for ci, c in enumerate(chunks):
                    logits = _response_logits(model, batch, c, tc.precision)
                    logp = token_logprobs(logits, batch["tokens"][c])
                    if it == 0:                                # θ = θ_old here: these ARE the old log-probs
                        old_logp.append(logp.detach())
                        ent = token_entropy(logits.detach())
                        sums["entropy"] += float((ent * mask[c]).sum()) / n_tok_all
                    loss, stats = policy_loss(
                        logp, old_logp[ci], adv[c], mask[c], eps_low=gc.eps_low, eps_high=gc.eps_high,
                        beta=gc.beta, ref_logp=None if ref_logp is None else ref_logp[c], aggregation=gc.aggregation,
                        max_len=cfg.sampling.max_new_tokens, n_seqs=n_seqs, n_tokens=n_norm)
                    for r in par.reducers if par is not None else ():
                        r.armed = ci == len(chunks) - 1       # average while the last chunk's backward runs
                    loss.backward()
                    share = float(mask[c].sum()) / n_tok_all / gc.mu
                    sums["loss"] += float(loss.detach()) / (gc.mu * ranks)
                    sums["clip_frac"] += float(stats["clip_frac"]) * share
                    sums["kl"] += float(stats.get("kl", 0.0)) * share
                if par is None:
                    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
                else:
                    par.finish_grads()                         # every rank, even one without rollouts
                    grad_norm = par.clip_grad_norm_(cfg.optim.grad_clip or math.inf)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if value_model is not None:                    # the critic's own update on the same batch
                    set_lr(value_opt, cfg.ppo.value_lr * lr / cfg.optim.lr)
                    for c in chunks:
                        v = _response_values(value_model, batch, c, tc.precision)
                        vl = value_loss(v, old_values[c], returns[c], mask[c], cfg.ppo.value_clip)
                        (vl * float(mask[c].sum()) / n_tok).backward()
                        sums["value_loss"] += float(vl.detach()) * float(mask[c].sum()) / n_tok / gc.mu
                    torch.nn.utils.clip_grad_norm_(value_model.parameters(), cfg.optim.grad_clip or math.inf)
                    value_opt.step()
                    value_opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            train_time = time.perf_counter() - t_train
            if par is not None:                                # each rank summed its share of the global means
                keys = ("loss", "clip_frac", "entropy", "kl")
                t = ctx.all_reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64), "sum", "dp")
                sums.update(zip(keys, t.tolist()))
            rec.update({k: v for k, v in sums.items() if k != "value_loss" or value_model is not None})
            if reference is None:
                rec.pop("kl")
            rec.update(lr=lr, grad_norm=float(grad_norm),
                       train_tokens_per_s=tokens * gc.mu / max(train_time, 1e-9),
                       step_time=time.perf_counter() - t_step)
            done = step + 1
            if main and eval_problems and (done == tc.steps or (cfg.eval.every and done % cfg.eval.every == 0)):
                rec.update(_eval_record(model, tokenizer, eval_problems, cfg, run_dir, done))
            log.log(done, rec)
            if main and (done == tc.steps or cfg.checkpoint.due(done, tc.steps)):
                write_plots(run_dir, read_jsonl(log.path))
            if main and cfg.checkpoint.due(done, tc.steps):
                state = {"optimizer": optimizer.state_dict()}
                if value_model is not None:
                    state.update(value_model=value_model.state_dict(), value_optimizer=value_opt.state_dict())
                save_checkpoint(run_dir, done, model, state, cfg.checkpoint.keep_last)
    if main:
        export_final(run_dir, model, tokenizer)
    return model


def _gathered_rollout_metrics(exp: Experience, G: int) -> tuple[dict, int]:
    """(`_rollout_metrics` over every dp rank's rollouts, kept rows on all ranks); generation throughput
    is all ranks' tokens over the slowest rank's time."""
    import torch.distributed as dist

    mine = (exp.sampled, exp.n_groups_sampled, exp.n_groups_zero_var, exp.gen_tokens, exp.gen_time, len(exp.prompts))
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    merged = Experience(sampled=[s for e in everyone for s in e[0]], n_groups_sampled=sum(e[1] for e in everyone),
                        n_groups_zero_var=sum(e[2] for e in everyone), gen_tokens=sum(e[3] for e in everyone),
                        gen_time=max(e[4] for e in everyone))
    kept = sum(e[5] for e in everyone)
    rec = _rollout_metrics(merged, G)
    rec["groups"] = kept // G
    return rec, kept


def _rollout_metrics(exp: Experience, G: int) -> dict:
    """Means over every completion sampled this step (refill rounds included)."""
    n = len(exp.sampled)
    rec = {f"reward/{k}": sum(r[k] for r, _, _ in exp.sampled) / n for k in exp.sampled[0][0]}
    rec["accuracy"] = sum(r["accuracy"] >= 1.0 for r, _, _ in exp.sampled) / n
    rec["response_length"] = sum(length for _, length, _ in exp.sampled) / n
    rec["truncated_share"] = sum(trunc for _, _, trunc in exp.sampled) / n
    rec["zero_var_share"] = exp.n_groups_zero_var / max(exp.n_groups_sampled, 1)
    rec["groups"] = len(exp.prompts) // G
    rec["gen_tokens_per_s"] = exp.gen_tokens / max(exp.gen_time, 1e-9)
    return rec
