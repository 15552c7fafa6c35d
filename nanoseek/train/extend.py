"""`nanoseek extend`: context extension with YaRN (V3 §4.3), and a pass-key retrieval check.

V3 pretrains at 4K, then extends to 32K and 128K in two short stages, each continuing training at the longer
length with YaRN set in the config (factor 40, β_fast 32, β_slow 1; the attention temperature √t = 0.1·ln s + 1
enters MLA's softmax scale). Here the same recipe runs scaled down (tiny: 256 → 1024, factor 4): the base
model's weights are kept, `rope_scaling` and `max_position_embeddings` change, and training continues on long
documents.

Long documents: filler texts (corpus documents) as a haystack with key statements ("The pass key of box red is
482.") at chosen depths, and questions for the keys at the end — the long-range dependency short documents
lack. Two checks, each for the base model as it is, the base with YaRN switched on but not trained, and the
extended model:
- key-value retrieval (the pass-key test of the YaRN paper): the key asked at the end sits at fixed depths of
  documents of each length; a key counts when every digit is the greedy (argmax) prediction given the right
  digits before it;
- next-token loss and top-1 accuracy by position band (0-255, 256-511, 512-1023 for tiny): what breaks first
  past the trained length, and what extension restores.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanoseek.config import ModelConfig
from nanoseek.data import PackedDataset, check_model_fit, write_shards
from nanoseek.data.corpus import build_corpus
from nanoseek.errors import UserError
from nanoseek.files import atomic_write_json, atomic_write_text
from nanoseek.hf import load_pretrained
from nanoseek.model import build_model
from nanoseek.run import (autocast, check_run_dir, export_final, finished, load_init, seed_everything, setup_torch,
                          start_run)
from nanoseek.tokenizer import Tokenizer, check_vocab_fits
from nanoseek.train.optim import OptimConfig
from nanoseek.train.runs import DataConfig, fixed_batches, task_evaluator
from nanoseek.train.trainer import CheckpointConfig, TrainEvalConfig, TrainConfig, prepare_model, train

BOXES = ("red", "blue", "green", "gold", "iron", "oak", "sky", "sun", "moon", "star", "rain", "snow", "sand",
         "rock", "fire", "ice")
NEEDLE = " The pass key of box {box} is {key}."
QUESTION = "\nWhat is the pass key of box {box}? The pass key of box {box} is"


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
    digits: int = 3                             # pass-key length
    needles: int = 4                            # key statements per document (training documents ask them all)
    lengths: list[int] = field(default_factory=lambda: [256, 512, 1024])   # context lengths checked
    depths: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    per_cell: int = 8                           # documents per (length, depth)
    loss_documents: int = 16                    # documents of the longest length for the position bands
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
    eval: TrainEvalConfig = field(default_factory=lambda: TrainEvalConfig(every=0, problems=0))
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
    """Key-value retrieval documents of an exact token length: filler texts (the haystack) with `needles`
    statements "The pass key of box red is 482." at chosen depths, then questions "What is the pass key of box
    red? The pass key of box red is" each followed by its key.

    Built from token ids, not text, so that lengths are exact: a training document is exactly train.seq_len
    tokens, and the packed rows (seq_len long) each hold one whole document, every key in the same row as its
    question at every distance up to the full length. Training documents ask for every key (dense signal:
    a handful of copied tokens per thousand is too little for a 4-layer model to learn retrieval in a few
    hundred steps); evaluation documents ask for one, the one placed at the depth under test."""

    def __init__(self, tok, filler: list[str], digits: int, needles: int = 4):
        if not filler:
            raise UserError("no filler texts for the pass-key documents; the corpus is empty")
        if not 1 <= needles <= len(BOXES):
            raise UserError(f"retrieval.needles={needles} must be in 1..{len(BOXES)}")
        self.tok, self.digits, self.needles = tok, digits, needles
        self.filler_ids = tok.encode_batch(filler)
        self.newline = tok.encode("\n")

    def document(self, rng: random.Random, n_tokens: int, depth: float, queries: int = 1,
                 eos: bool = False) -> tuple[list[int], list[tuple[int, int]]]:
        """(ids, answer spans): exactly n_tokens ids starting with bos; the first needle sits at `depth` of the
        haystack (the others at random depths) and the first `queries` needles are asked, in random order.
        A span (start, end) holds the ids of one asked key."""
        tok = self.tok
        boxes = rng.sample(BOXES, self.needles)
        keys = ["".join(rng.choice("0123456789") for _ in range(self.digits)) for _ in boxes]
        needles = [tok.encode(NEEDLE.format(box=b, key=k)) for b, k in zip(boxes, keys)]
        asked = rng.sample(range(queries), queries)
        tail, spans = [], []
        for i in asked:
            tail += tok.encode(QUESTION.format(box=boxes[i]))
            spans.append((len(tail), len(tail) + len(tok.encode(" " + keys[i]))))
            tail += tok.encode(" " + keys[i] + ".")
        head, end = ([tok.bos_id] if tok.bos_id is not None else []), ([tok.eos_id] if eos else [])
        budget = n_tokens - len(head) - sum(map(len, needles)) - len(tail) - len(end)
        if budget < 0:
            raise UserError(f"a pass-key document of {n_tokens} tokens is too short for {self.needles} needles; "
                            "raise the length or lower retrieval.needles")
        haystack: list[int] = []
        while len(haystack) < budget:                          # whole filler texts, the last one cut to fit
            haystack += self.filler_ids[rng.randrange(len(self.filler_ids))] + self.newline
        cuts = [int(depth * budget)] + [rng.randrange(budget + 1) for _ in needles[1:]]
        ids, prev = list(head), 0
        for at, needle in sorted(zip(cuts, needles), key=lambda c: c[0]):
            ids += haystack[prev:at] + needle
            prev = at
        ids += haystack[prev:budget]
        offset = len(ids)
        return ids + tail + end, [(offset + s, offset + e) for s, e in spans]

    def train_ids(self, rng: random.Random, n: int, n_tokens: int) -> list[list[int]]:
        """n training documents of exactly n_tokens ids (bos ... eos), every needle asked."""
        return [self.document(rng, n_tokens, rng.random(), self.needles, eos=True)[0] for _ in range(n)]


def _logits(model, rows: list[list[int]], pad_id: int, precision: str) -> torch.Tensor:
    """Logits [B, T, V] (fp32, CPU) of right-padded id rows."""
    device = next(model.parameters()).device
    x = torch.full((len(rows), max(map(len, rows))), pad_id, dtype=torch.long)
    for r, ids in enumerate(rows):
        x[r, :len(ids)] = torch.tensor(ids)
    with autocast(device, precision):
        return model(x.to(device)).logits.float().cpu()


@torch.no_grad()
def retrieval_accuracy(model, docs: list[tuple[list[int], list[tuple[int, int]]]], pad_id: int,
                       precision: str = "fp32", batch_size: int = 4) -> float:
    """Share of asked keys the model would decode greedily: with teacher forcing, every key id must be the
    argmax given the ids before it. docs: (ids, answer spans) from PassKeyDocs.document."""
    was_training = model.training
    model.eval()
    right = total = 0
    for i in range(0, len(docs), batch_size):
        chunk = docs[i:i + batch_size]
        pred = _logits(model, [ids for ids, _ in chunk], pad_id, precision).argmax(-1)     # [B, T]: id t+1
        for r, (ids, spans) in enumerate(chunk):
            for start, end in spans:
                right += bool((pred[r, start - 1:end - 1] == torch.tensor(ids[start:end])).all())
                total += 1
    model.train(was_training)
    return right / max(total, 1)


@torch.no_grad()
def position_bands(model, docs: list[list[int]], edges: list[int], pad_id: int, precision: str = "fp32",
                   batch_size: int = 4) -> dict[str, list[float]]:
    """Next-token loss (nats) and top-1 accuracy of the tokens at positions [0, edges[0]), [edges[0], edges[1]),
    ... of `docs`: {"loss": [...], "accuracy": [...]}, one value per band.

    The long-context perplexity check of the YaRN paper (§4.3.1), by position band: a model that breaks past
    its trained length shows it in the later bands, whatever the text is about."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, len(edges), dtype=torch.float64)          # [loss, right] summed per band
    counts = torch.zeros(len(edges), dtype=torch.float64)
    for i in range(0, len(docs), batch_size):
        rows = [ids[:edges[-1] + 1] for ids in docs[i:i + batch_size]]
        width = max(map(len, rows))
        logits = _logits(model, [ids[:-1] for ids in rows], pad_id, precision)           # [B, T-1, V]
        targets = torch.full((len(rows), width - 1), -100, dtype=torch.long)
        for r, ids in enumerate(rows):
            targets[r, :len(ids) - 1] = torch.tensor(ids[1:])
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [B, T-1]
        right = logits.argmax(-1) == targets
        band = torch.bucketize(torch.arange(width - 1), torch.tensor(edges), right=True).expand_as(loss)
        valid = targets != -100
        sums[0].index_add_(0, band[valid], loss[valid].double())
        sums[1].index_add_(0, band[valid], right[valid].double())
        counts.index_add_(0, band[valid], torch.ones(int(valid.sum()), dtype=torch.float64))
    model.train(was_training)
    mean = sums / counts.clamp(min=1)
    return {"loss": mean[0].tolist(), "accuracy": mean[1].tolist()}


def retrieval_table(models: dict, gen: PassKeyDocs, rc: RetrievalConfig, pad_id: int, precision: str) -> list[dict]:
    """Accuracy per (length, depth) for each named model, on the same documents."""
    rows = []
    for length in rc.lengths:
        for depth in rc.depths:
            rng = random.Random(f"{rc.seed}-{length}-{depth}")
            docs = [gen.document(rng, length, depth) for _ in range(rc.per_cell)]
            row = {"length": length, "depth": depth, "n": len(docs)}
            for name, model in models.items():
                row[name] = retrieval_accuracy(model, docs, pad_id, precision)
            rows.append(row)
    return rows


def markdown(result: dict, names: list[str]) -> str:
    """Two tables: pass-key accuracy by context length and key depth, and validation loss by position band."""
    rows = result["retrieval"]
    lines = ["Pass-key retrieval (greedy, every key digit right):", "",
             "| context | key depth | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in rows:
        lines.append(f"| {r['length']} | {r['depth']:.0%} | " + " | ".join(f"{100 * r[n]:.0f}%" for n in names) + " |")
    for length in sorted({r["length"] for r in rows}):
        sub = [r for r in rows if r["length"] == length]
        lines.append(f"| {length} | mean | " + " | ".join(
            f"**{100 * sum(r[n] for r in sub) / len(sub):.0f}%**" for n in names) + " |")
    bands = result["bands"]
    lines += ["", "Next-token loss (nats) and top-1 accuracy by position, on documents of the longest context:", "",
              "| positions | " + " | ".join(f"{n} loss | {n} acc" for n in names) + " |",
              "|---|" + "---|---|" * len(names)]
    for i, (lo, hi) in enumerate(bands["positions"]):
        lines.append(f"| {lo}-{hi - 1} | " + " | ".join(
            f"{bands[n]['loss'][i]:.3f} | {100 * bands[n]['accuracy'][i]:.1f}%" for n in names) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- the stage

def extend(cfg: ExtendConfig, out: str | Path, resume: bool = False, progress: bool = True) -> Path:
    """Continue training `cfg.init` at `train.seq_len` with YaRN; write eval/retrieval.{json,md}."""
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
    gen = PassKeyDocs(tok, texts[len(texts) // 10:], rc.digits, rc.needles)
    val_gen = PassKeyDocs(tok, texts[:len(texts) // 10], rc.digits, rc.needles)
    for part, g, n in (("train", gen, rc.train_documents), ("val", val_gen, rc.val_documents)):
        if not (out / "data" / part / "index.json").is_file():
            docs = g.train_ids(random.Random(f"{rc.seed}-{part}"), n, tc.seq_len)
            write_shards(docs, tok, out / "data" / part, progress=progress)
    train_data = PackedDataset(out / "data" / "train", tc.seq_len, tc.batch_size, seed=tc.seed, model_config=model_cfg)
    val = PackedDataset(out / "data" / "val", tc.seq_len, 1, shuffle=False)
    val_batches = fixed_batches(val, cfg.eval.val_batches, tc.batch_size, val.n_rows)

    seed_everything(tc.seed)
    model = build_model(model_cfg)
    model.load_state_dict(base.state_dict())
    model = prepare_model(model, tc, device)
    edges = sorted(rc.lengths)
    loss_rng = random.Random(f"{rc.seed}-loss")
    loss_docs = [val_gen.document(loss_rng, edges[-1], loss_rng.random())[0] for _ in range(rc.loss_documents)]

    def measure(models: dict) -> dict:
        return {"retrieval": retrieval_table(models, val_gen, rc, tok.pad_id, tc.precision),
                "bands": {name: position_bands(m, loss_docs, edges, tok.pad_id, tc.precision)
                          for name, m in models.items()}}

    before_file = out / "eval" / "long_context_before.json"
    if not before_file.is_file():           # measured once, before the first step (kept across --resume)
        atomic_write_json(before_file, measure({"base": base, "base + YaRN": model}))
    before = json.loads(before_file.read_text(encoding="utf-8"))
    del base
    if resume_from is not None:
        model = prepare_model(load_pretrained(resume_from), tc, device)
    train(model, cfg, out, train_data, val_batches=val_batches, evaluate=evaluate,
          resume_from=resume_from, description="extend", progress=progress)
    after = measure({"extended": model})
    result = {"retrieval": [{**b, **a} for b, a in zip(before["retrieval"], after["retrieval"])],
              "bands": {"positions": [[lo, hi] for lo, hi in zip([0] + edges[:-1], edges)],
                        **before["bands"], **after["bands"]}}
    atomic_write_json(out / "eval" / "long_context.json", result)
    table = markdown(result, ["base", "base + YaRN", "extended"])
    atomic_write_text(out / "eval" / "long_context.md", table)
    print(table)
    return export_final(out, model, tok)
