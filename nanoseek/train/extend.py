"""`nanoseek extend`: context extension with YaRN (V3 §4.3), and a pass-key retrieval check.

V3 pretrains at 4K, then extends to 32K and 128K in two short stages, each continuing training at the longer
length with YaRN set in the config (factor 40, β_fast 32, β_slow 1; the attention temperature √t = 0.1·ln s + 1
enters MLA's softmax scale). Here the same recipe runs scaled down (tiny: 256 → 1024, factor 4): the base
model's weights are kept, `rope_scaling` and `max_position_embeddings` change, and training continues on long
documents.

Long documents: corpus texts concatenated as filler up to a random length, with a pass key ("The pass key is
48213.") hidden at a random depth and asked for at the end — the long-range dependency short documents lack.
The check (the pass-key test of the YaRN paper) places the key at fixed depths in filler of each length and
counts a document right when the greedy continuation of "The pass key is" is the key: with teacher forcing,
every key digit must be the argmax given the correct digits before it. Columns: the base model as it is,
the base with YaRN switched on but no training, and the extended model.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoseek.config import ModelConfig
from nanoseek.errors import UserError
from nanoseek.files import atomic_write_json, atomic_write_text
from nanoseek.train.commands import (DataConfig, check_run_dir, export_final, finished, fixed_batches, load_init,
                                     seed_everything, setup_torch, start_run, task_evaluator)
from nanoseek.train.optim import OptimConfig
from nanoseek.train.trainer import CheckpointConfig, EvalConfig, TrainConfig, autocast, prepare_model, train

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class YarnConfig:
    factor: float = 4.0                         # new context = factor × original (V3: 40 over 4K)
    original_max_position_embeddings: int = 0   # 0 = the base model's max_position_embeddings
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0


@dataclass
class RetrievalConfig:
    train_documents: int = 600                  # long training documents (filler + pass key)
    val_documents: int = 16
    min_frac: float = 0.25                      # training documents are min_frac..1 × train.seq_len tokens
    digits: int = 5                             # pass-key length
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024])   # context lengths checked
    depths: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    per_cell: int = 8                           # documents per (length, depth)
    seed: int = 1234


@dataclass
class ExtendConfig:
    init: str | None = None                     # the base model (--init), e.g. runs/pretrain/final
    yarn: YarnConfig = field(default_factory=YarnConfig)
    data: DataConfig = field(default_factory=DataConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=5, decay_frac=0.3))
    train: TrainConfig = field(default_factory=lambda: TrainConfig(steps=60, batch_size=4, seq_len=1024,
                                                                   mtp_lambda=0.1))
    eval: EvalConfig = field(default_factory=lambda: EvalConfig(every=0, problems=0))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every=20))


def yarn_config(base: ModelConfig, yc: YarnConfig) -> ModelConfig:
    """The base config with YaRN set: an already-extended base keeps its original length and multiplies
    the factors (V3's 4K → 32K → 128K stages share one original length)."""
    old = base.rope_scaling if base.rope_scaling and base.rope_scaling.get("type") == "yarn" else None
    original = yc.original_max_position_embeddings or (
        old["original_max_position_embeddings"] if old else base.max_position_embeddings)
    factor = yc.factor * (float(old["factor"]) if old else 1.0)
    if factor < 1:
        raise UserError(f"yarn.factor={yc.factor}: context extension needs a factor >= 1")
    scaling = {"type": "yarn", "factor": factor, "original_max_position_embeddings": original,
               "beta_fast": yc.beta_fast, "beta_slow": yc.beta_slow, "mscale": yc.mscale,
               "mscale_all_dim": yc.mscale_all_dim}
    return base.replace(rope_scaling=scaling, max_position_embeddings=int(round(original * factor)))


# ---------------------------------------------------------------- pass-key documents

class PassKeyDocs:
    """Builds pass-key documents of a given token length from filler texts."""

    def __init__(self, tok, filler: list[str], digits: int):
        if not filler:
            raise UserError("no filler texts for the pass-key documents; the corpus is empty")
        self.tok, self.digits = tok, digits
        self.filler = filler
        self.filler_tokens = [len(ids) for ids in tok.encode_batch(filler)]
        self.fixed_tokens = len(tok.encode(NEEDLE.format(key="0" * digits) + QUESTION)) + digits + 2

    def make(self, rng: random.Random, n_tokens: int, depth: float) -> tuple[str, str]:
        """(prompt ending in "The pass key is", answer " 48213"): about n_tokens tokens, key at `depth`."""
        key = "".join(rng.choice("0123456789") for _ in range(self.digits))
        budget = max(0, n_tokens - self.fixed_tokens)
        pieces, counts = [], []                                   # filler texts and their tokens (+1 newline)
        while sum(counts) < budget:
            i = rng.randrange(len(self.filler))
            pieces.append(self.filler[i])
            counts.append(self.filler_tokens[i] + 1)
        cut, seen = 0, 0                                          # the needle goes after `cut` filler texts
        while cut < len(pieces) and seen + counts[cut] <= depth * sum(counts):
            seen += counts[cut]
            cut += 1
        before, after = "\n".join(pieces[:cut]), "\n".join(pieces[cut:])
        text = before + NEEDLE.format(key=key) + ("\n" + after if after else "")
        return text + QUESTION, " " + key

    def train_texts(self, rng: random.Random, n: int, min_tokens: int, max_tokens: int) -> list[str]:
        docs = []
        for _ in range(n):
            prompt, answer = self.make(rng, rng.randint(min_tokens, max_tokens), rng.random())
            docs.append(prompt + answer + ".")
        return docs


@torch.no_grad()
def retrieval_accuracy(model, tok, docs: list[tuple[str, str]], precision: str = "fp32", batch_size: int = 4) -> float:
    """Share of (prompt, answer) documents whose answer the model would decode greedily (teacher forcing)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bos = [tok.bos_id] if tok.bos_id is not None else []
    rows = []
    for prompt, answer in docs:
        p, full = bos + tok.encode(prompt), bos + tok.encode(prompt + answer)
        if full[:len(p)] != p:
            raise UserError(f"tokenizer {tok.source} merges the pass key into the prompt's last token; "
                            "retrieval needs digits that tokenize apart")
        rows.append((full, len(p)))
    correct = 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        x = torch.full((len(chunk), width), tok.pad_id, dtype=torch.long)
        for r, (ids, _) in enumerate(chunk):
            x[r, :len(ids)] = torch.tensor(ids)
        with autocast(device, precision):
            pred = model(x.to(device)).logits.argmax(-1).cpu()                 # [B, T]: prediction of t+1
        for r, (ids, start) in enumerate(chunk):
            target = torch.tensor(ids[start:])
            correct += bool((pred[r, start - 1:len(ids) - 1] == target).all())
    model.train(was_training)
    return correct / max(len(rows), 1)


def retrieval_table(models: dict, tok, gen: PassKeyDocs, rc: RetrievalConfig, precision: str) -> list[dict]:
    """Accuracy per (length, depth) for each named model, on the same documents."""
    rows = []
    for length in rc.lengths:
        for depth in rc.depths:
            rng = random.Random(f"{rc.seed}-{length}-{depth}")
            docs = [gen.make(rng, length, depth) for _ in range(rc.per_cell)]
            row = {"length": length, "depth": depth, "n": len(docs)}
            for name, model in models.items():
                row[name] = retrieval_accuracy(model, tok, docs, precision)
            rows.append(row)
    return rows


def markdown(rows: list[dict], names: list[str]) -> str:
    lines = ["| context | key depth | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in rows:
        lines.append(f"| {r['length']} | {r['depth']:.0%} | " + " | ".join(f"{100 * r[n]:.0f}%" for n in names) + " |")
    for length in sorted({r["length"] for r in rows}):
        sub = [r for r in rows if r["length"] == length]
        lines.append(f"| {length} | mean | " + " | ".join(
            f"**{100 * sum(r[n] for r in sub) / len(sub):.0f}%**" for n in names) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the stage

def extend(cfg: ExtendConfig, out: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Continue training `cfg.init` at `train.seq_len` with YaRN; write eval/retrieval.{json,md}."""
    from nanoseek.data import PackedDataset, check_model_fit, write_shards
    from nanoseek.data.corpus import build_corpus
    from nanoseek.hf import load_pretrained
    from nanoseek.model import build_model
    from nanoseek.tokenizer import Tokenizer, check_vocab_fits

    out = Path(out)
    if not cfg.init:
        raise UserError("extend needs a base model: pass --init MODEL_DIR (e.g. runs/pretrain/final)")
    device = setup_torch(cfg.train)
    base, tok_dir = load_init(cfg.init, device)
    if not isinstance(base.config, ModelConfig):
        raise UserError(f"--init {cfg.init} is a {base.config.model_type} model; extend works on DeepSeek models")
    tok = Tokenizer.load(cfg.data.tokenizer or tok_dir)
    check_vocab_fits(len(tok), base.config.vocab_size)
    model_cfg = yarn_config(base.config, cfg.yarn)
    check_model_fit(model_cfg, seq_len=cfg.train.seq_len)
    rc, tc = cfg.retrieval, cfg.train
    if max(rc.lengths) > model_cfg.max_position_embeddings:
        raise UserError(f"retrieval.lengths reach {max(rc.lengths)} > the extended max_position_embeddings "
                        f"{model_cfg.max_position_embeddings}; lower them or raise yarn.factor")
    evaluate = task_evaluator(cfg.eval, tok, model_cfg, tc.seed)
    resume_from = check_run_dir(out, cfg, resume)
    if finished(out, resume_from, tc.steps):
        return out / "final"

    start_run(out, cfg, tok)
    texts = [d.text for d in build_corpus(cfg.data.corpus)]
    gen = PassKeyDocs(tok, texts[len(texts) // 10:], rc.digits)
    val_gen = PassKeyDocs(tok, texts[:len(texts) // 10], rc.digits)
    lo = max(1, int(rc.min_frac * tc.seq_len))
    for part, g, n in (("train", gen, rc.train_documents), ("val", val_gen, rc.val_documents)):
        if not (out / "data" / part / "index.json").is_file():
            texts = g.train_texts(random.Random(f"{rc.seed}-{part}"), n, lo, tc.seq_len)
            write_shards(texts, tok, out / "data" / part, progress=progress)
    train_data = PackedDataset(out / "data" / "train", tc.seq_len, tc.batch_size, seed=tc.seed, model_config=model_cfg)
    val = PackedDataset(out / "data" / "val", tc.seq_len, 1, shuffle=False)
    val_batches = fixed_batches(val, cfg.eval.val_batches, tc.batch_size, val.n_rows)

    seed_everything(tc.seed)
    model = build_model(model_cfg)
    model.load_state_dict(base.state_dict())
    model = prepare_model(model, tc, device)
    before_file = out / "eval" / "retrieval_before.json"
    if not before_file.is_file():           # measured once, before the first step (kept across --resume)
        before = retrieval_table({"base": base, "base + YaRN": model}, tok, val_gen, rc, tc.precision)
        atomic_write_json(before_file, before)
    before = json.loads(before_file.read_text(encoding="utf-8"))
    del base
    if resume_from is not None:
        model = prepare_model(load_pretrained(resume_from), tc, device)
    train(model, cfg, out, train_data, val_batches=val_batches, evaluate=evaluate,
          resume_from=resume_from, description="extend", progress=progress)
    after = retrieval_table({"extended": model}, tok, val_gen, rc, tc.precision)
    rows = [{**b, **a} for b, a in zip(before, after)]
    names = ["base", "base + YaRN", "extended"]
    atomic_write_json(out / "eval" / "retrieval.json", rows)
    table = markdown(rows, names)
    atomic_write_text(out / "eval" / "retrieval.md", table)
    print(table)
    return export_final(out, model, tok)

