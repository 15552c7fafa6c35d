"""Distillation: a dense student learns from the teacher's correct reasoning traces (R1 report §2.4, §4.1).

R1 fine-tunes small Qwen / Llama models on the 800K samples its pipeline curated and finds this beats
running the same large-scale RL on the small model directly: the small model cannot discover the
reasoning patterns by itself, but it can imitate them. Here:

    traces   the teacher samples K completions per TRAIN prompt; the correct, well-formed, one-language,
             distinct ones are kept (nanoseek.r1.rejection.sample_traces) — or the user's chat JSONL;
    SFT      the student (any nanoseek model; the pipeline uses the Llama-style DenseForCausalLM) is
             fine-tuned on them with the loss on the response tokens (nanoseek.train.runs.sft);
    KL       optionally, when teacher and student share the tokenizer, a logit-matching term on the same
             response tokens (Hinton et al. 2015), added to the SFT loss:

                 L = CE + λ · T² · mean_t Σ_v p_T(v | t) (log p_T(v | t) − log p_S(v | t)),   p at temperature T

R1 itself uses plain SFT (λ = 0, the default); the KL term uses the teacher's whole distribution, not
just its sampled token. It is attached as a forward hook on the student's training forwards (those called
with labels in training mode), so the shared training loop, its checkpoints and resume stay unchanged;
the logged "loss" then includes the KL term, validation loss does not.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek.data import load_chat_records
from nanoseek.errors import UserError
from nanoseek.hf import find_tokenizer, load_checkpoint
from nanoseek.model.deepseek import ModelOutput
from nanoseek.r1.rejection import TraceConfig, cached_records, default_sft_config, sft_on, teacher_traces
from nanoseek.run import resolve_device
from nanoseek.train.runs import SFTConfig


@dataclass
class KLConfig:
    weight: float = 0.0               # λ; 0 = plain SFT on the traces (R1's distillation)
    temperature: float = 1.0          # T of both distributions


@dataclass
class DistillConfig:
    teacher: str | None = None        # teacher model directory (samples the traces; the KL target)
    init: str | None = None           # the student to fine-tune: a pretrained model directory
    data: str | None = None           # a chat JSONL of traces instead of sampling the teacher
    traces: TraceConfig = field(default_factory=lambda: TraceConfig(prompts=512, samples=4))
    kl: KLConfig = field(default_factory=KLConfig)
    epochs: float = 2.0               # SFT passes over the traces; 0 = use sft.train.steps
    sft: SFTConfig = field(default_factory=default_sft_config)


def logit_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """T² · mean over positions with labels != -100 of KL(p_teacher ‖ p_student) at temperature T.

    logits [B, T, V] (any float dtype; computed in fp32), labels [B, T] aligned (-100 = no loss).
    """
    mask = labels != -100                                                       # [B, T]
    s = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)       # [N, V]
    t = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)                                            # [N]
    return temperature ** 2 * kl.sum() / mask.sum().clamp_min(1)


@contextmanager
def kl_to_teacher(teacher: torch.nn.Module, weight: float, temperature: float = 1.0):
    """Inside the block, every training-mode forward called with `labels` (the student's, in the shared
    training loop) returns loss = CE + weight · logit_kl(student, teacher) on the labelled positions."""
    from torch.nn.modules.module import register_module_forward_hook

    teacher.eval().requires_grad_(False)

    def hook(module, args, kwargs, output):
        labels = kwargs.get("labels")
        if labels is None or module is teacher or not module.training or not isinstance(output, ModelOutput):
            return None
        ids = args[0] if args else kwargs["input_ids"]
        with torch.no_grad():
            t_logits = teacher(ids, attention_mask=kwargs.get("attention_mask"),
                               position_ids=kwargs.get("position_ids")).logits
        kl = logit_kl(output.logits, t_logits, labels, temperature)
        return dataclasses.replace(output, loss=output.loss + weight * kl)

    handle = register_module_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _same_tokenizer(a: str | Path, b: str | Path) -> bool:
    return (find_tokenizer(a) / "tokenizer.json").read_bytes() == (find_tokenizer(b) / "tokenizer.json").read_bytes()


def build_traces(cfg: DistillConfig, out: Path, progress: bool = True) -> tuple[Path, dict]:
    """out/traces.jsonl (+ stats) sampled from the teacher; reused when already there; or the user's file."""
    if cfg.data:
        n = len(load_chat_records(cfg.data))
        return Path(cfg.data), {"kept": n, "examples": n}

    def build() -> tuple[list[dict], dict]:
        records, stats = teacher_traces(cfg.teacher, cfg.traces, cfg.sft.train.device, progress)
        if not records:
            raise UserError(f"the teacher got none of {stats['sampled']} samples right in the expected format; "
                            "sample more (traces.prompts, traces.samples) or use a stronger teacher")
        stats["examples"] = len(records)
        return records, stats

    return cached_records(out / "traces.jsonl", out / "traces_stats.json", build)


def distill(cfg: DistillConfig, out: str | Path, progress: bool = True) -> dict:
    """Traces from the teacher into out/, then SFT (+ optional KL) of the student into out/sft."""
    out = Path(out)
    if not cfg.init:
        raise UserError("distill needs a student to train: pass --init MODEL_DIR (a pretrained student)")
    if not cfg.data and not cfg.teacher:
        raise UserError("distill needs traces: pass --teacher MODEL_DIR to sample them, or --data TRACES.jsonl")
    if cfg.kl.weight > 0:
        if not cfg.teacher:
            raise UserError("kl.weight > 0 needs the teacher's logits: pass --teacher MODEL_DIR")
        if not _same_tokenizer(cfg.teacher, cfg.init):
            raise UserError("kl.weight > 0 needs teacher and student to share one tokenizer (the logits must index "
                            "the same vocabulary); set kl.weight=0 for plain trace SFT")
    path, stats = build_traces(cfg, out, progress)
    n = stats["examples"]
    if cfg.kl.weight > 0:
        teacher, _ = load_checkpoint(cfg.teacher, resolve_device(cfg.sft.train.device))
        with kl_to_teacher(teacher, cfg.kl.weight, cfg.kl.temperature):
            final = sft_on(path, cfg.init, cfg.sft, out / "sft", cfg.epochs, n, progress)
    else:
        final = sft_on(path, cfg.init, cfg.sft, out / "sft", cfg.epochs, n, progress)
    return {"traces": str(path), "stats": stats, "final": str(final)}
