"""The training loop shared by pretraining, SFT and context extension.

One optimizer step (V3 §2, §4.2):

    for each of `grad_accum` micro-batches:   loss = CE + λ·MTP + α·L_bal   (backward, summed)
    clip the global grad norm; AdamW step at the warmup-stable-decay LR
    b_i += γ·sign(mean(c) − c_i)              auxiliary-loss-free balancing (V3 §2.1.2) from the
                                              step's whole-batch expert loads c (all micro-batches)

CE and each MTP depth are weighted by each micro-batch's share of the step's target tokens
(`nanoseek.model.loss.training_loss`, the objective of every parallel layout too), so accumulating k
micro-batches gives the gradient of one k-times larger batch even when SFT masks a different number of
tokens per micro-batch. The step runs through `Parallel` (`Parallel.single` on one process). Nothing in
the loop draws random numbers except through the data iterator, whose position is checkpointed, and
evaluation runs inside `torch.random.fork_rng`, so a resumed CPU run replays the uninterrupted one bit for
bit.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Protocol

import torch

from nanoseek.errors import UserError
from nanoseek.info import account
from nanoseek.model.chunked_ce import chunked_cross_entropy
from nanoseek.model import set_activation_checkpointing
from nanoseek.model.compile import compile_blocks
from nanoseek.model.deepseek import DeepseekV3ForCausalLM
from nanoseek.model.dense import DenseForCausalLM
from nanoseek.model.moe import expert_loads, max_violation, moe_layers, update_router_biases
from nanoseek.parallel import Parallel
from nanoseek.recipe import Range
from nanoseek.run import autocast, steps_with_gc
from nanoseek.run.checkpoint import load_trainer_state, rng_state, save_checkpoint, set_rng_state
from nanoseek.sampling.rollout import SamplingConfig
from nanoseek.tasks.base import ANSWER_FORMATS
from nanoseek.train.fp8 import convert_to_fp8
from nanoseek.train.logger import MetricsLogger
from nanoseek.train.optim import OptimConfig, build_optimizer, set_lr, wsd_lr


@dataclass
class TrainConfig:
    steps: int = 300                  # optimizer steps
    batch_size: int = 16              # sequences per micro-batch
    grad_accum: int = 1               # micro-batches per optimizer step
    seq_len: int = 256                # tokens per training row
    precision: str = "fp32"           # "fp32" | "bf16" (autocast) | "fp8" (nanoseek.train.fp8, V3 §3.3)
    fp8_min_features: int = 6144      # fp8: only layers whose GEMMs are this wide in and out run FP8, the rest bf16
                                      # (narrower, FP8 + quantisation is slower than bf16: benchmarks/RESULTS.md); 0 = all
    compile: bool | str = "auto"      # regional torch.compile of the decoder blocks: "auto" = on CUDA only, true, false
    loss_chunk: int = 0               # rows per chunk of the cross-entropy (model/chunked_ce.py: no fp32 [N, V]); 0 = off
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward (model/recompute.py):
                                      # ~1/3 more compute, activations of one layer at a time instead of all
    device: str = "auto"              # "auto" = cuda if available, else cpu
    seed: int = 0
    threads: int = 0                  # torch CPU threads; 0 = torch's default
    mtp_lambda: float = 0.3           # λ of the MTP loss (V3 §2.2: 0.3 early, 0.1 later)
    balance_alpha: float = 1e-4       # α of the sequence-wise balance loss (V3 §2.1.2)
    bias_gamma: float = 1e-3          # γ of the aux-loss-free bias update; 0 switches it off
    peak_flops: float = 717e12        # accelerator peak for MFU (docs/DESIGN.md §8: H100 bf16 matmul, measured)

    def __post_init__(self) -> None:
        compile_enabled(self.compile, torch.device("cpu"))    # a bad value fails as the recipe is read
        if self.loss_chunk < 0:
            raise UserError(f"train.loss_chunk={self.loss_chunk}: use 0 (off) or rows per chunk, e.g. 1024")
        if self.fp8_min_features < 0:
            raise UserError(f"train.fp8_min_features={self.fp8_min_features}: use 0 (every layer runs FP8) or a "
                            "width, e.g. 4096")


@dataclass
class TrainEvalConfig:
    """Evaluation during training: the held-out loss, and pass@1 on held-out task problems."""
    every: int = 100                  # evaluate every N steps (and after the last); 0 = only after the last
    val_batches: int = 4              # held-out batches for the validation loss
    tasks: list[str] = field(default_factory=lambda: ["arithmetic", "countdown", "linear"])
    data: str = ""                    # a JSONL of test problems (GSM8K / MATH / question-answer) instead of `tasks`
    problems: int = 48                # held-out problems for pass@1: the first N of `data`, else TEST-split ones
                                      # of `tasks` (none for SFT on a user's data.path without `data`); 0 = skip
    difficulty: int | dict | None = None  # task level of those problems (one, or {family: level}); None = default mixes
    samples: int = 1                  # samples per problem for pass@1
    # the R1 report's evaluation sampling: temperature 0.6, top-p 0.95
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(temperature=0.6, top_p=0.95))
    template: str = "r1_zero"         # prompt format (nanoseek.sampling.rollout.encode_prompt): r1_zero | chat | plain
    answer_format: str = "answer_tag"  # where the answer is judged: answer_tag | boxed | gsm8k (nanoseek.sampling.rewards)
    CHECKS: ClassVar[dict] = {"samples": Range(1)}

    def __post_init__(self) -> None:
        if self.answer_format not in ANSWER_FORMATS:
            raise UserError(f"eval.answer_format={self.answer_format!r}; choose one of {', '.join(ANSWER_FORMATS)}")


@dataclass
class CheckpointConfig:
    every: int = 100                  # save every N steps (and after the last)
    keep_last: int = 2
    final: bool = True                # also save after the last step; false: only the exported final/ model (a
                                      # pipeline stage, whose done.json marks it finished, skips writing its
                                      # optimizer state: ~11 GB for the small teacher)

    CHECKS: ClassVar[dict] = {"keep_last": Range(1)}

    def due(self, done: int, steps: int) -> bool:
        """Whether a checkpoint is written after step `done` of `steps`."""
        if done == steps:
            return self.final
        return bool(self.every) and done % self.every == 0


class Batches(Protocol):
    """What the loop needs from a data set: an endless iterator of (input_ids, labels) [B, T] long
    tensors (labels aligned, -100 = ignore) whose position survives `state_dict`/`load_state_dict`."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def prepare_model(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """Move to the device, keep fp32 master weights (bf16 and fp8 compute under autocast, for every model),
    swap in FP8 linears when asked (V3 §3.3), compile, checkpoint activations when asked.

    FP8 comes first so the compiled graphs trace the FP8 GEMMs (opaque custom ops) rather than the plain
    Linears they replace.
    """
    model = model.to(device=device, dtype=torch.float32)
    if cfg.precision == "fp8":
        model = convert_to_fp8(model, min_features=cfg.fp8_min_features) or model
    compile_for_training(model, cfg.compile, device)
    set_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.loss_chunk:                             # replaces the (compiled or eager) whole-logits loss
        if not hasattr(model, "loss_fn"):
            raise UserError(f"train.loss_chunk supports nanoseek's DeepSeek-V3 and dense models, not "
                            f"{type(model).__name__}; set train.loss_chunk=0")
        model.loss_fn = functools.partial(chunked_cross_entropy, chunk=cfg.loss_chunk)
    model.train()
    return model


def compile_enabled(setting: bool | str, device: torch.device) -> bool:
    """What `train.compile` (every trainer's one compile key) means on `device`: "auto" and true compile on
    CUDA, where the fused blocks run the `small` step ~1.7x faster than eager (benchmarks/RESULTS.md); nothing
    compiles on the CPU, where Inductor's code gains little at the tiny shapes and the MoE's grouped GEMM has no
    fp32 compiled kernel. true differs from "auto" only in refusing a model compile_blocks cannot compile."""
    if setting != "auto" and not isinstance(setting, bool):
        raise UserError(f"train.compile={setting!r}; use \"auto\" (on CUDA, off on the CPU), true or false")
    return setting is not False and device.type == "cuda"


def compile_for_training(model: torch.nn.Module, setting: bool | str, device: torch.device,
                         dynamic: bool | None = False) -> torch.nn.Module:
    """Regional compile (`compile_blocks`, in place) when `train.compile` says so: only the cache-free forward
    of each block and the loss are compiled, so generation with a KV cache (rollouts, evaluation) stays eager
    and parameter names, state dicts and checkpoints are those of the eager model. `dynamic`: False for fixed
    training shapes (pretraining rows), None where lengths vary per batch (RL, reward model): compiled once
    per shape, then with symbolic shapes after the first change, instead of once per length."""
    if not compile_enabled(setting, device):
        return model
    if isinstance(model, DeepseekV3ForCausalLM) or (setting is True and isinstance(model, DenseForCausalLM)):
        return compile_blocks(model, dynamic=dynamic)
    if setting is True:
        raise UserError(f"train.compile=true supports DeepSeek-V3 and dense models, not {type(model).__name__}; "
                        "set train.compile=false")
    return model      # "auto": dense models train eager unless asked (their compiled path is measured in pretraining
                      # only)


def flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token as `nanoseek info` counts them: 6 × activated matmul weights + attention."""
    return float(account(model.config, seq_len)["train_flops_per_token"])


@torch.no_grad()
def validation_loss(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                    device: torch.device, precision: str) -> float:
    """Token-weighted mean next-token CE over fixed held-out batches (eval mode: no expert-load counting).
    Eager even when the blocks are compiled: eval mode without gradients is a new graph for every block, and
    compiling it for a few batches cost ~25 s on the `small` model (H200) where the eager forward takes ~1 s."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.compiler.set_stance("force_eager"):
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast(device, precision):
                out = model(x, labels=y)
            n = int((y != -100).sum())
            total += float(out.loss) * n
            count += n
    model.train(was_training)
    return total / max(count, 1)


def forward_backward(model: torch.nn.Module, micro: list[tuple[torch.Tensor, torch.Tensor]], tc: TrainConfig,
                     device: torch.device) -> tuple[float, float, float]:
    """Accumulate the gradient of one optimizer step over `micro` batches in this process; returns the step's
    (CE, MTP, balance) losses. The objective is `nanoseek.model.loss.training_loss` (token-share weights), run
    by the one-process `Parallel`, exactly as under any parallel layout."""
    losses = Parallel.single(model).forward_backward(micro, tc.mtp_lambda, tc.balance_alpha,
                                                     lambda: autocast(device, tc.precision))
    return losses["loss"], losses["mtp_loss"], losses["balance_loss"]


class NullLogger:
    """What ranks other than 0 log to under data parallel: nothing (rank 0 writes metrics and shows progress)."""

    def __enter__(self) -> "NullLogger":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def log(self, step: int, metrics: dict) -> None:
        pass


def train(model: torch.nn.Module, cfg, run_dir: str | Path, train_data: Batches, *,
          val_batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
          evaluate: Callable[[torch.nn.Module], dict] | None = None,
          resume_from: str | Path | None = None,
          reduce_loads: Callable[[torch.Tensor], torch.Tensor] | None = None,
          par: Parallel | None = None, description: str = "train", progress: bool = True) -> torch.nn.Module | None:
    """Run `cfg.train.steps` optimizer steps on `model` (already prepared, on its device), logging to
    `run_dir/metrics.jsonl` and checkpointing to `run_dir/checkpoints`.

    cfg: any config tree with `.train` (TrainConfig), `.optim` (OptimConfig), `.eval` (TrainEvalConfig) and
    `.checkpoint` (CheckpointConfig) sections. evaluate(model) -> dict of extra metrics (e.g. pass@1) run
    at eval steps. reduce_loads: where the [L_moe, E] expert loads are summed over the ranks before the bias
    update (default `par.reduce_loads`: identity on one process).

    par: `model` laid out over the ranks (nanoseek.parallel.parallelize); None means one process
    (`Parallel.single`, a world of size 1). Every rank reads the same global batches (train.batch_size rows
    per micro-batch) and `par` takes this rank's rows, so a step means the same on any layout; the expert
    loads are summed over the ranks; at eval and checkpoint steps the model is gathered into its
    single-device form on rank 0, which alone evaluates and writes metrics and checkpoints (the same files a
    one-process run writes, so any layout resumes any other). Returns the trained model (on rank 0 its gathered copy; None on the other ranks).
    """
    tc: TrainConfig = cfg.train
    oc: OptimConfig = cfg.optim
    device = next(model.parameters()).device

    def make_optimizer(module: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(module, oc)

    par = par or Parallel.single(model)
    optimizer = make_optimizer(par.module())
    main, world = par.ctx.is_main, par.ctx.world
    reduce_loads = reduce_loads or par.reduce_loads
    start = 0
    if resume_from is not None:
        state = load_trainer_state(resume_from)
        par.load_optimizer_state_dict(optimizer, state["optimizer"], make_optimizer)
        train_data.load_state_dict(state["data"])
        set_rng_state(state["rng"])
        start = int(state["step"])
    has_moe = bool(moe_layers(model))
    mfu_flops = flops_per_token(model, tc.seq_len) if device.type == "cuda" else 0.0
    batches = iter(train_data)

    def trainer_state() -> dict:
        opt = par.optimizer_state_dict(optimizer, make_optimizer)
        return {"optimizer": opt, "data": train_data.state_dict(), "rng": rng_state()}

    full = model                                                      # the single-device model (rank 0)
    logger = MetricsLogger(run_dir, tc.steps, start, description=description, progress=progress) if main else NullLogger()
    with logger as log:
        for step in steps_with_gc(range(start, tc.steps)):
            t0 = time.perf_counter()
            lr = wsd_lr(step, tc.steps, oc)
            set_lr(optimizer, lr)
            micro = [next(batches) for _ in range(tc.grad_accum)]
            clip = oc.grad_clip if oc.grad_clip > 0 else math.inf
            losses = par.forward_backward(micro, tc.mtp_lambda, tc.balance_alpha,
                                          lambda: autocast(device, tc.precision))
            ce, mtp, bal = losses["loss"], losses["mtp_loss"], losses["balance_loss"]
            grad_norm = par.clip_grad_norm_(clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record = {"loss": ce, "mtp_loss": mtp, "balance_loss": bal, "lr": lr, "grad_norm": float(grad_norm)}
            if has_moe:                                                # V3 §2.1.2, after the step
                loads = reduce_loads(expert_loads(model))
                maxvio = max_violation(loads)
                update_router_biases(model, loads, tc.bias_gamma)
                record["maxvio"] = [round(v, 6) for v in maxvio.tolist()]
                record["maxvio_mean"] = float(maxvio.mean())
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            record["tokens_per_s"] = tc.grad_accum * tc.batch_size * tc.seq_len / dt
            if mfu_flops:
                record["mfu"] = record["tokens_per_s"] * mfu_flops / (tc.peak_flops * world)
            done = step + 1
            evaluating = done == tc.steps or (cfg.eval.every and done % cfg.eval.every == 0)
            saving = cfg.checkpoint.due(done, tc.steps)
            if evaluating or saving:
                full = par.full_model()                                # every rank gathers; None off rank 0
            if evaluating and main:
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    if val_batches:
                        record["val_loss"] = validation_loss(full, val_batches, device, tc.precision)
                    if evaluate is not None:
                        full.eval()
                        record.update(evaluate(full))
                        full.train()
            log.log(done, record)
            if saving:
                state = trainer_state()
                if main:
                    save_checkpoint(run_dir, done, full, state, cfg.checkpoint.keep_last)
    return full if start < tc.steps else par.full_model()             # no step ran (resumed at the end)
