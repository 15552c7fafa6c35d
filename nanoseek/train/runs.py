"""Pretraining and SFT runs (`nanoseek pretrain | sft`): their configs and the data each trains on.

Every stage is one config tree (defaults = the tiny CPU recipe) resolved from `--recipe` and `--set`, then:
validate everything that can be wrong (config, tokenizer vs model vocab, seq_len vs the model's positions,
the data) BEFORE the run directory is touched, write the resolved `config.toml`, train with the shared loop
(nanoseek.train.trainer), and export `final/` (HF model + tokenizer, so `load_pretrained(run/final)` works).

Run directory: config.toml, tokenizer/, data/ (pretrain/extend shards), sft_data.json (SFT: examples
truncated, dropped, without a trained token), metrics.jsonl, tb/,
checkpoints/step-N/, final/ (kept by nanoseek.run). `--resume` continues from the newest checkpoint; the resolved config must be the
one the run started with (train.steps, eval and checkpoint settings may change).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from nanoseek.config import ModelConfig
from nanoseek.data import PackedDataset, SFTDataset, check_model_fit, load_chat_records
from nanoseek.data.corpus import CorpusConfig, build_corpus, prepare_corpus
from nanoseek.data.sft import check_truncation_mode
from nanoseek.errors import UserError
from nanoseek.files import atomic_write_json
from nanoseek.eval import PassAtKConfig, evaluate
from nanoseek.hf import load_pretrained
from nanoseek.model import build_model
from nanoseek.parallel import ParallelConfig, parallelize
from nanoseek.recipe import Alias, from_dict
from nanoseek.run import (check_run_dir, checkpoint_dtype, export_final, finished, join_ranks, load_init, rank0_first,
                          seed_everything, setup_torch, start_run)
from nanoseek.sampling.rewards import RewardConfig
from nanoseek.sampling.rollout import encode_prompt, stop_conditions
from nanoseek.tasks import sample_problems
from nanoseek.tasks.problems import load_problems
from nanoseek.tokenizer import Tokenizer, check_vocab_fits
from nanoseek.train.lora import LoRAConfig, apply_lora, finish_lora, resume_adapter
from nanoseek.train.optim import OptimConfig
from nanoseek.train.trainer import CheckpointConfig, TrainEvalConfig, TrainConfig, prepare_model, train


# ---------------------------------------------------------------- configs

@dataclass
class DataConfig:
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    tokenizer: str | None = None      # HF tokenizer dir; None = train a byte-level BPE of model.vocab_size


@dataclass
class PretrainConfig:
    init: str | None = None           # start from these HF weights instead of a random init (--init)
    model: dict = field(default_factory=lambda: {"preset": "tiny"})   # preset + ModelConfig field overrides
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: TrainEvalConfig = field(default_factory=TrainEvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)   # used under torchrun (docs/DESIGN.md §5)


@dataclass
class SFTDataConfig:
    path: str | None = None           # SFT JSONL (messages, prompt/response, prompt/completion, text: data/sft.py);
    #                                   None = task worked solutions
    examples: int = 2000              # with path None: train-split problems turned into chat examples
    val_examples: int = 64            # held out from the data for the validation loss
    tokenizer: str | None = None      # None = the one next to the --init checkpoint
    # TRL's names: loss on the assistant turns only (conversational data), on the completion only
    # (prompt/completion data; off = the whole sequence)
    assistant_only_loss: bool = True
    completion_only_loss: bool = True
    truncation_mode: str = "keep_start"   # examples over train.seq_len + 1 tokens: keep_start | keep_end | drop
    packing: bool = False             # whole examples packed into seq_len rows (attention crosses them)

    def __post_init__(self) -> None:
        check_truncation_mode(self.truncation_mode, "data.truncation_mode")


@dataclass
class SFTConfig:
    init: str | None = None           # the model to fine-tune (--init), e.g. runs/pretrain/final
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=10))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100, mtp_lambda=0.1))
    eval: TrainEvalConfig = field(default_factory=lambda: TrainEvalConfig(every=50, template="chat"))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=50))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)             # lora.r > 0: train adapters only (train/lora.py)
    ALIASES: ClassVar[dict] = {"learning_rate": Alias("optim.lr")}   # TRL's SFTConfig name (docs/trl.md)


# ---------------------------------------------------------------- model section

def resolve_model(section: dict) -> ModelConfig:
    """`{preset, field overrides}` -> a validated ModelConfig (UserError naming a bad key or value)."""
    section = dict(section)
    preset = section.pop("preset", "tiny")
    base = dataclasses.asdict(ModelConfig.preset(preset))
    return from_dict(ModelConfig, {**base, **section}, "model")


def model_section(cfg: ModelConfig, preset: str) -> dict:
    """The resolved model section written to config.toml: the preset name and every field spelled out."""
    return {"preset": preset, **dataclasses.asdict(cfg)}


# ---------------------------------------------------------------- evaluation during training

def task_evaluator(ec: TrainEvalConfig, tok, model_cfg, seed: int, user_data: bool = False):
    """pass@1 (and pass@K for K > 1 samples) on the first eval.problems of eval.data, else on held-out
    TEST-split task problems (not when the run trains on `user_data`: nanoseek's synthetic tasks say nothing
    about it), sampled with the rollout engine (R1 report settings).
    Checked up front, before the run directory is written: the stop strings, the prompts' template, and the
    longest prompt plus max_new_tokens against the model's positions."""
    if not ec.problems or not (ec.data or (ec.tasks and not user_data)):
        return None

    problems = load_problems(ec.tasks, ec.data, ec.problems, "test", seed, ec.difficulty)
    stop_conditions(tok, ec.sampling.stop)
    rewards = RewardConfig(answer_format=ec.answer_format)
    longest = max(len(encode_prompt(tok, p.prompt, ec.template)) for p in problems)
    budget = ec.sampling.max_new_tokens
    if longest + budget > model_cfg.max_position_embeddings:
        raise UserError(f"eval prompts reach {longest} tokens + eval.sampling.max_new_tokens={budget} > the model's "
                        f"max_position_embeddings={model_cfg.max_position_embeddings}; lower eval.sampling.max_new_tokens "
                        "or set eval.problems=0")
    sampling = PassAtKConfig(samples=ec.samples, sampling=ec.sampling, greedy=False, template=ec.template, seed=seed)

    def run(model) -> dict:
        result = evaluate(model, tok, problems, sampling, rewards=rewards)
        out = {"pass@1": result["pass@1"]["mean"], "format": result["format"]["mean"]}
        if ec.samples > 1:                          # the headroom RL can use: pass@K well above pass@1
            out[f"pass@{ec.samples}"] = result["pass@k"][str(ec.samples)]["mean"]
        return out
    return run


def fixed_batches(dataset, n: int, batch_size: int, n_items: int) -> list | None:
    """The first n batches of an unshuffled held-out dataset of n_items rows: the same at every evaluation."""
    return [dataset.next_batch(min(batch_size, n_items)) for _ in range(n)] if n else None


# ---------------------------------------------------------------- pretrain

def corpus_datasets(cfg, tok, model_cfg: ModelConfig, out: Path, progress: bool):
    """(train PackedDataset, fixed validation batches) from the corpus shards under out/data."""
    tc = cfg.train
    train_dir, val_dir = prepare_corpus(out / "data", cfg.data.corpus, tok, progress=progress)
    train_data = PackedDataset(train_dir, tc.seq_len, tc.batch_size, seed=tc.seed, model_config=model_cfg)
    val = PackedDataset(val_dir, tc.seq_len, 1, shuffle=False)
    return train_data, fixed_batches(val, cfg.eval.val_batches, tc.batch_size, val.n_rows)


def corpus_tokenizer(cfg, vocab_size: int, resume_dir: Path | None = None, init_tok: Path | None = None):
    """The run's tokenizer: given, the --init model's, already in the run (resume), or trained on the corpus."""
    if cfg.data.tokenizer or init_tok:
        return Tokenizer.load(cfg.data.tokenizer or init_tok)
    if resume_dir is not None and (resume_dir / "tokenizer" / "tokenizer.json").is_file():
        return Tokenizer.load(resume_dir / "tokenizer")
    return Tokenizer.train((d.text for d in build_corpus(cfg.data.corpus)), vocab_size)


def pretrain(cfg: PretrainConfig, out: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Pretrain (next-token + MTP + balancing) into run directory `out`; returns `out/final`."""
    out = Path(out)
    device = setup_torch(cfg.train)
    ctx, device = join_ranks(cfg.parallel, cfg.train, device)
    main = ctx is None or ctx.is_main
    init_model = init_tok = None
    if cfg.init:                                   # continued pretraining: the model and its tokenizer
        init_model, init_tok = load_init(cfg.init, device)
        model_cfg = init_model.config
        cfg = dataclasses.replace(cfg, model=model_section(model_cfg, "init"))
    else:
        model_cfg = resolve_model(cfg.model)
        cfg = dataclasses.replace(cfg, model=model_section(model_cfg, cfg.model.get("preset", "tiny")))
    check_model_fit(model_cfg, seq_len=cfg.train.seq_len)
    if ctx is not None:
        ctx.cfg.check_model(model_cfg)
    resume_from = check_run_dir(out, cfg, resume)
    if finished(out, resume_from, cfg.train.steps):
        return out / "final"
    with rank0_first(ctx):                         # the other ranks read rank 0's tokenizer and shards
        tok = corpus_tokenizer(cfg, model_cfg.vocab_size, out if resume or not main else None, init_tok)
        check_vocab_fits(len(tok), model_cfg.vocab_size)
        evaluate = task_evaluator(cfg.eval, tok, model_cfg, cfg.train.seed)
        if main:
            start_run(out, cfg, tok)
        train_data, val_batches = corpus_datasets(cfg, tok, model_cfg, out, progress and main)
    seed_everything(cfg.train.seed)
    if resume_from is not None:
        model = load_pretrained(resume_from)
    elif init_model is not None:
        model = init_model
    else:
        # one process initialises on its training device: seconds on a GPU, ~9 s for `small` on 16 CPU cores
        with torch.device(device if ctx is None else "cpu"):
            model = build_model(model_cfg)
    model = prepare_model(model, cfg.train, device)
    par = parallelize(model, ctx=ctx) if ctx is not None else None
    model = train(model, cfg, out, train_data, val_batches=val_batches, evaluate=evaluate, resume_from=resume_from,
                  par=par, description="pretrain", progress=progress)
    return export_final(out, model, tok, checkpoint_dtype(cfg.init)) if main else out / "final"


# ---------------------------------------------------------------- SFT

def sft_records(dc: SFTDataConfig, tasks: list[str], seed: int) -> list[dict]:
    """Chat records: the user's JSONL, or worked solutions of train-split task problems (prompt → solution)."""
    if dc.path:
        return load_chat_records(dc.path)

    return [{"prompt": p.prompt, "response": p.solution}
            for p in sample_problems(tasks, dc.examples, split="train", seed=seed)]


def sft(cfg: SFTConfig, out: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Fine-tune `cfg.init` on chat data with the loss on responses only; returns `out/final`."""
    out = Path(out)
    if not cfg.init:
        raise UserError("sft needs a model to start from: pass --init MODEL_DIR (e.g. runs/pretrain/final)")
    device = setup_torch(cfg.train)
    ctx, device = join_ranks(cfg.parallel, cfg.train, device)
    main = ctx is None or ctx.is_main
    model, tok_dir = load_init(cfg.init, device)
    tok = Tokenizer.load(cfg.data.tokenizer or tok_dir)
    records = sft_records(cfg.data, cfg.eval.tasks, cfg.train.seed)
    n_val = min(cfg.data.val_examples, len(records) // 10)
    tc, dc = cfg.train, cfg.data
    loss = dict(assistant_only_loss=dc.assistant_only_loss, completion_only_loss=dc.completion_only_loss,
                truncation_mode=dc.truncation_mode, model_config=model.config)
    train_data = SFTDataset(records[n_val:], tok, tc.seq_len, tc.batch_size, seed=tc.seed, packing=dc.packing, **loss)
    val_batches, data_stats = None, {"train": train_data.stats}
    if n_val:                                      # unpacked: the loss of each example on its own
        val = SFTDataset(records[:n_val], tok, tc.seq_len, 1, shuffle=False, **loss)
        val_batches = fixed_batches(val, cfg.eval.val_batches, tc.batch_size, len(val.examples))
        data_stats["val"] = val.stats
    evaluate = task_evaluator(cfg.eval, tok, model.config, tc.seed, user_data=bool(cfg.data.path))
    if ctx is not None:
        ctx.cfg.check_model(model.config)
        if cfg.lora.enabled:
            raise UserError("lora under torchrun is not supported; run LoRA SFT as one process or set lora.r=0")
    if cfg.lora.enabled and tc.precision == "fp8":      # FP8 GEMMs would take the rank-r adapters too
        raise UserError("lora trains with train.precision fp32 or bf16, not fp8")
    apply_lora(model, cfg.lora, tc.seed)           # a model LoRA does not support fails here, before the run dir
    resume_from = check_run_dir(out, cfg, resume)
    if finished(out, resume_from, tc.steps):
        return out / "final"

    with rank0_first(ctx):
        if main:
            start_run(out, cfg, tok)
            atomic_write_json(out / "sft_data.json", data_stats)
            print(f"sft data: {train_data.stats['kept']} of {train_data.stats['examples']} training examples in "
                  f"{train_data.stats['rows']} rows; {train_data.describe()} (data.truncation_mode="
                  f"{dc.truncation_mode}; details in {out / 'sft_data.json'})", file=sys.stderr)
    seed_everything(tc.seed)
    if resume_from is not None:                    # LoRA: the frozen base is --init, the adapter what was trained
        model = resume_adapter(model, resume_from) if cfg.lora.enabled else load_pretrained(resume_from)
    model = prepare_model(model, tc, device)
    par = parallelize(model, ctx=ctx) if ctx is not None else None
    model = train(model, cfg, out, train_data, val_batches=val_batches, evaluate=evaluate,
                  resume_from=resume_from, par=par, description="sft", progress=progress)
    return export_final(out, finish_lora(model, out, cfg.init), tok, checkpoint_dtype(cfg.init)) if main else out / "final"
