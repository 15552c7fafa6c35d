"""`nanoseek pretrain | sft | extend`: configs, run directories, and the data each stage trains on.

Every stage is one config tree (defaults = the tiny CPU recipe) resolved from `--recipe` and `--set`, then:
validate everything that can be wrong (config, tokenizer vs model vocab, seq_len vs the model's positions,
the data) BEFORE the run directory is touched, write the resolved `config.toml`, train with the shared loop
(nanoseek.train.trainer), and export `final/` (HF model + tokenizer, so `load_pretrained(run/final)` works).

Run directory: config.toml, tokenizer/, data/ (pretrain/extend shards), metrics.jsonl, tb/,
checkpoints/step-N/, final/. `--resume` continues from the newest checkpoint; the resolved config must be the
one the run started with (train.steps, eval and checkpoint settings may change).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from nanoseek.config import ModelConfig
from nanoseek.data.corpus import CorpusConfig
from nanoseek.errors import UserError
from nanoseek.files import atomic_dir, atomic_write_text, check_run_target, clean_stale_tmp, read_jsonl
from nanoseek.parallel import ParallelConfig, parallelize
from nanoseek.parallel.mesh import destroy
from nanoseek.recipe import from_dict, load_recipe, to_dict, to_toml
from nanoseek.train.checkpoint import latest_checkpoint
from nanoseek.train.optim import OptimConfig
from nanoseek.train.trainer import CheckpointConfig, EvalConfig, TrainConfig, prepare_model, resolve_device, train


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)   # used under torchrun (DESIGN §5)


@dataclass
class SFTDataConfig:
    path: str | None = None           # chat JSONL (prompt/response or messages); None = task worked solutions
    examples: int = 2000              # with path None: train-split problems turned into chat examples
    val_examples: int = 64            # held out from the data for the validation loss
    tokenizer: str | None = None      # None = the one next to the --init checkpoint


@dataclass
class SFTConfig:
    init: str | None = None           # the model to fine-tune (--init), e.g. runs/pretrain/final
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=10))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=100, mtp_lambda=0.1))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(every=50, template="chat"))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=50))
    parallel: ParallelConfig = field(default_factory=ParallelConfig)


# Settings a resumed run may change: how long to train, how often to evaluate and checkpoint, whether to
# compile, the CPU threads, and the parallel layout (checkpoints are single-device files, so any layout
# resumes any other).
RESUMABLE_CHANGES = ("train.steps", "train.compile", "train.threads", "eval.", "checkpoint.", "parallel.")


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


# ---------------------------------------------------------------- run directory

def check_run_dir(out: Path, cfg, resume: bool) -> Path | None:
    """Refuse to overwrite a run or write into a user's folder (nanoseek.files.check_run_target); on resume,
    check the config matches. Returns the checkpoint to resume from."""
    check_run_target(out, resume)
    if not resume:
        return None
    if (out / "metrics.jsonl").is_file():
        read_jsonl(out / "metrics.jsonl")          # garbage in it is a UserError now, not after data preparation
    saved = out / "config.toml"
    if saved.is_file():
        try:
            old = _flatten(tomllib.loads(saved.read_text(encoding="utf-8")))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"{saved} is corrupt ({str(e)[:80]}); restore it, or start a new run with another --out") from None
        new = _flatten(tomllib.loads(to_toml(cfg)))
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key) and not key.startswith(RESUMABLE_CHANGES):
                raise UserError(f"--resume: {key} = {new.get(key)!r} differs from {old.get(key)!r} in {saved}; "
                                "resume with the run's own recipe, or start a new run with another --out")
    return latest_checkpoint(out)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and not (prefix == "model." and k == "rope_scaling"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def finished(out: Path, resume_from: Path | None, steps: int) -> bool:
    """A resumed run whose last checkpoint is the last step and whose final/ export exists: nothing to do."""
    return (resume_from is not None and resume_from.name == f"step-{steps}"
            and (out / "final" / "config.json").is_file())


def start_run(out: Path, cfg, tok) -> None:
    """Create the run directory with its resolved config and tokenizer (idempotent on resume)."""
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(out)                           # what a killed attempt left half-written
    atomic_write_text(out / "config.toml", to_toml(cfg))
    if not (out / "tokenizer" / "tokenizer.json").is_file():
        tok.save(out / "tokenizer")


def export_final(out: Path, model, tok) -> Path:
    """`final/`: the HF model and its tokenizer, loadable with `load_pretrained` and `nanoseek eval`."""
    from nanoseek.hf import save_pretrained

    with atomic_dir(out / "final") as tmp:
        save_pretrained(model, tmp)
        for f in (out / "tokenizer").iterdir():
            shutil.copy2(f, tmp / f.name)
    return out / "final"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_torch(tc: TrainConfig) -> torch.device:
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = resolve_device(tc.device)
    if tc.precision not in ("fp32", "bf16", "fp8"):
        raise UserError(f"train.precision={tc.precision!r}; choose fp32, bf16 or fp8")
    if tc.batch_size < 1 or tc.grad_accum < 1 or tc.steps < 1 or tc.seq_len < 2:
        raise UserError("train.steps, train.batch_size and train.grad_accum must be >= 1 and train.seq_len >= 2")
    return device


def join_ranks(pc: ParallelConfig, tc, device: torch.device):
    """(ParallelContext, this rank's device) when torchrun launched several processes (WORLD_SIZE > 1):
    join the process group (NCCL on GPUs, gloo on CPU) and check the batch splits over the layout. On one
    process: (None, device), after checking that the [parallel] section asks for one rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        pc.resolve(1)
        return None, device
    if device.type != ("cuda" if torch.cuda.is_available() else "cpu"):
        raise UserError(f"train.device={tc.device!r} under torchrun: the ranks use "
                        f"{'the GPUs' if torch.cuda.is_available() else 'the CPU'}; set train.device=\"auto\"")
    from nanoseek.parallel import init_distributed
    ctx = init_distributed(pc)
    batch = getattr(tc, "batch_size", None)
    if batch is not None:
        dp, mb = ctx.cfg.dp, ctx.cfg.microbatches
        if batch % dp:
            raise UserError(f"train.batch_size={batch} is not divisible by parallel.dp={dp}: every data-parallel "
                            "rank takes an equal share of each batch; make it a multiple")
        if ctx.cfg.pp > 1 and (batch // dp * tc.grad_accum) % mb:
            raise UserError(f"{batch // dp * tc.grad_accum} rows per rank per step do not split into "
                            f"parallel.microbatches={mb}; change train.batch_size or parallel.microbatches")
    return ctx, ctx.device


@contextlib.contextmanager
def rank0_first(ctx):
    """Rank 0 runs the body (writing the run directory: config, tokenizer, data shards) before the other
    ranks run it (reading what rank 0 wrote). All ranks have checked the run directory by then. Several
    nodes need the run directory on a file system they share."""
    if ctx is None or not ctx.distributed:
        yield
        return
    ctx.barrier()
    if not ctx.is_main:
        ctx.barrier()
    yield
    if ctx.is_main:
        ctx.barrier()


def load_init(path: str, device: torch.device):
    """(model, tokenizer dir) of an HF checkpoint to start from; UserError when it is not one."""
    from nanoseek.eval import find_tokenizer
    from nanoseek.hf import load_pretrained

    p = Path(path)
    if not p.is_dir():
        raise UserError(f"--init {path} is not a directory; pass a model directory such as runs/pretrain/final")
    return load_pretrained(p, device=str(device)), find_tokenizer(p)


# ---------------------------------------------------------------- evaluation during training

def task_evaluator(ec: EvalConfig, tok, model_cfg, seed: int):
    """pass@1 (and pass@K for K > 1 samples) on held-out TEST-split task problems, sampled with the rollout
    engine (R1 report settings).
    Checked up front: the longest prompt plus max_new_tokens must fit the model's positions."""
    if not ec.problems or not ec.tasks:
        return None
    from nanoseek.eval import EvalConfig as SamplingEval, evaluate
    from nanoseek.rl.rollout import encode_prompt
    from nanoseek.tasks import sample_problems

    problems = sample_problems(ec.tasks, ec.problems, split="test", seed=seed, difficulty=ec.difficulty)
    longest = max(len(encode_prompt(tok, p.prompt, ec.template)) for p in problems)
    if longest + ec.max_new_tokens > model_cfg.max_position_embeddings:
        raise UserError(f"eval prompts reach {longest} tokens + eval.max_new_tokens={ec.max_new_tokens} > the model's "
                        f"max_position_embeddings={model_cfg.max_position_embeddings}; lower eval.max_new_tokens "
                        "or set eval.problems=0")
    sampling = SamplingEval(samples=ec.samples, temperature=ec.temperature, top_p=ec.top_p,
                            max_new_tokens=ec.max_new_tokens, greedy=False, template=ec.template, seed=seed)

    def run(model) -> dict:
        result = evaluate(model, tok, problems, sampling)
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
    from nanoseek.data import PackedDataset
    from nanoseek.data.corpus import prepare_corpus

    tc = cfg.train
    train_dir, val_dir = prepare_corpus(out / "data", cfg.data.corpus, tok, progress=progress)
    train_data = PackedDataset(train_dir, tc.seq_len, tc.batch_size, seed=tc.seed, model_config=model_cfg)
    val = PackedDataset(val_dir, tc.seq_len, 1, shuffle=False)
    return train_data, fixed_batches(val, cfg.eval.val_batches, tc.batch_size, val.n_rows)


def corpus_tokenizer(cfg, vocab_size: int, resume_dir: Path | None = None, init_tok: Path | None = None):
    """The run's tokenizer: given, the --init model's, already in the run (resume), or trained on the corpus."""
    from nanoseek.data.corpus import build_corpus
    from nanoseek.tokenizer import Tokenizer

    if cfg.data.tokenizer or init_tok:
        return Tokenizer.load(cfg.data.tokenizer or init_tok)
    if resume_dir is not None and (resume_dir / "tokenizer" / "tokenizer.json").is_file():
        return Tokenizer.load(resume_dir / "tokenizer")
    return Tokenizer.train((d.text for d in build_corpus(cfg.data.corpus)), vocab_size)


def pretrain(cfg: PretrainConfig, out: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Pretrain (next-token + MTP + balancing) into run directory `out`; returns `out/final`."""
    from nanoseek.data import check_model_fit
    from nanoseek.model import build_model
    from nanoseek.tokenizer import check_vocab_fits

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
        from nanoseek.hf import load_pretrained
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
    return export_final(out, model, tok) if main else out / "final"


# ---------------------------------------------------------------- SFT

def sft_records(dc: SFTDataConfig, tasks: list[str], seed: int) -> list[dict]:
    """Chat records: the user's JSONL, or worked solutions of train-split task problems (prompt → solution)."""
    if dc.path:
        from nanoseek.data import load_chat_records
        return load_chat_records(dc.path)
    from nanoseek.data.sft import to_messages
    from nanoseek.tasks import sample_problems

    return [to_messages({"prompt": p.prompt, "response": p.solution})
            for p in sample_problems(tasks, dc.examples, split="train", seed=seed)]


def sft(cfg: SFTConfig, out: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Fine-tune `cfg.init` on chat data with the loss on responses only; returns `out/final`."""
    from nanoseek.data import SFTDataset
    from nanoseek.tokenizer import Tokenizer

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
    tc = cfg.train
    train_data = SFTDataset(records[n_val:], tok, tc.seq_len, tc.batch_size, seed=tc.seed, model_config=model.config)
    val_batches = None
    if n_val:
        val = SFTDataset(records[:n_val], tok, tc.seq_len, 1, shuffle=False, model_config=model.config)
        val_batches = fixed_batches(val, cfg.eval.val_batches, tc.batch_size, len(val.examples))
    evaluate = task_evaluator(cfg.eval, tok, model.config, tc.seed)
    if ctx is not None:
        ctx.cfg.check_model(model.config)
    resume_from = check_run_dir(out, cfg, resume)
    if finished(out, resume_from, tc.steps):
        return out / "final"

    with rank0_first(ctx):
        if main:
            start_run(out, cfg, tok)
    seed_everything(tc.seed)
    if resume_from is not None:
        from nanoseek.hf import load_pretrained
        model = load_pretrained(resume_from)
    model = prepare_model(model, tc, device)
    par = parallelize(model, ctx=ctx) if ctx is not None else None
    model = train(model, cfg, out, train_data, val_batches=val_batches, evaluate=evaluate,
                  resume_from=resume_from, par=par, description="sft", progress=progress)
    return export_final(out, model, tok) if main else out / "final"


# ---------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", help="TOML recipe, e.g. recipes/tiny.toml (defaults: the tiny CPU recipe)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set train.steps=100 (repeatable)")
    parser.add_argument("--out", help="run directory (default runs/<command>)")
    parser.add_argument("--init", help="model directory to start from (required for sft and extend)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs and CI)")


def run(args: argparse.Namespace) -> int:
    stages = {"pretrain": (PretrainConfig, pretrain), "sft": (SFTConfig, sft)}
    if args.command == "extend":
        from nanoseek.train.extend import ExtendConfig, extend
        stages["extend"] = (ExtendConfig, extend)
    cls, stage = stages[args.command]
    out = Path(args.out or f"runs/{args.command}")
    sets = list(args.sets) + ([f"init={json.dumps(args.init)}"] if args.init else [])
    if args.resume and args.recipe is None and (out / "config.toml").is_file():
        cfg = load_recipe(cls, out / "config.toml", sets)     # --resume without a recipe: the run's own config
    else:
        cfg = load_recipe(cls, args.recipe, sets)
    try:
        final = stage(cfg, out, resume=args.resume, progress=not args.no_progress)
    finally:
        destroy()                                  # leave the process group (torchrun runs)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"done: {final}")
    return 0
