"""A Bradley–Terry reward model: R1's stage-4 signal on prompts that no rule can check (R1 report §2.3.4).

Rules verify math; nothing verifies "be helpful, be harmless". R1 trains reward models on human preference
pairs for that. Ours learns from pairs the project generates (nanoseek.r1.general.preference_pairs:
correct vs wrong, concise vs rambling, refusing vs complying with a harmful request, answering vs refusing
a harmless one) or from a user's JSONL of {"prompt", "chosen", "rejected"}.

Model: any nanoseek causal LM as the backbone, plus a linear head on the final hidden state of the LAST
token of the rendered conversation (prompt + response, chat template, ending in eos):

    r(x, y) = w · h_T + b                                   h_T [H]: out.hidden_states[:, last]
    P(y_c ≻ y_r | x) = σ(r(x, y_c) − r(x, y_r))             Bradley–Terry (1952)
    L = −mean log σ(r_c − r_r)

Reported: the held-out pairwise accuracy (share of unseen pairs with r_c > r_r), overall and per kind.
Rows are right-padded and attention is causal, so the last real token never sees the padding. The backbone
stays in eval mode (no dropout exists; it keeps MoE layers from counting expert loads) while it trains.

Saved as an HF model directory (the backbone, loadable by itself) plus `reward_head/head.safetensors` and
`reward_model.json` (config + held-out accuracy); `load_reward_model(dir)` reads it back.
"""

from __future__ import annotations

import math
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from nanoseek.errors import UserError
from nanoseek.files import atomic_dir, atomic_write_json, iter_jsonl
from nanoseek.hf import load_checkpoint, save_pretrained
from nanoseek.run import load_init, resolve_device, seed_everything, steps_with_gc
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.logger import MetricsLogger
from nanoseek.train.optim import OptimConfig, build_optimizer, set_lr, wsd_lr
from nanoseek.train.trainer import compile_enabled, compile_for_training

HEAD_DIR = "reward_head"                  # head.safetensors in a subdirectory: the top level stays a plain HF
                                          # model (a loader globbing *.safetensors sees the backbone only)
LEGACY_HEAD_FILE = "reward_head.pt"       # reward models of earlier versions (torch's weights_only loader)
INFO_FILE = "reward_model.json"


@dataclass
class RMDataConfig:
    path: str | None = None           # JSONL of {"prompt", "chosen", "rejected"[, "kind"]}; None = generated pairs
    pairs: int = 1200                 # generated pairs (with path None)
    val_fraction: float = 0.2         # held out for the pairwise accuracy
    max_len: int = 160                # tokens per rendered conversation; longer pairs are dropped


@dataclass
class RMTrainConfig:
    steps: int = 120
    batch_size: int = 16              # pairs per step (2 × batch_size rows per forward)
    device: str = "auto"
    compile: bool | str = "auto"      # the backbone's blocks compiled (nanoseek.train.trainer.compile_for_training)
    seed: int = 0
    threads: int = 0

    def __post_init__(self) -> None:
        compile_enabled(self.compile, torch.device("cpu"))    # a bad value fails as the recipe is read


@dataclass
class RewardModelConfig:
    init: str | None = None           # backbone: any nanoseek model directory (e.g. the SFT model)
    data: RMDataConfig = field(default_factory=RMDataConfig)
    train: RMTrainConfig = field(default_factory=RMTrainConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=10, decay_frac=0.3,
                                                                   weight_decay=0.0))


class RewardModel(nn.Module):
    """backbone + scalar head: rewards [B] for right-padded conversations ids [B, T] of `lengths` [B]."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.hidden_size, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        h = self.backbone(ids).hidden_states                                   # [B, T, H]
        last = h[torch.arange(ids.shape[0], device=ids.device), lengths - 1]   # [B, H]
        return self.head(last.float()).squeeze(-1)                             # [B]


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """−mean log σ(r_c − r_r); softplus form is exact and stable for large margins."""
    return F.softplus(r_rejected - r_chosen).mean()


def visible_response(text: str) -> str:
    """What the reward model judges: the response with its <think>…</think> reasoning removed (R1 §2.3.4
    scores helpfulness on the summary only)."""
    return re.sub(r"<think>.*?(</think>|$)", "", text, flags=re.S).strip()


def encode_conversation(tok, prompt: str, response: str) -> list[int]:
    return tok.encode(tok.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": visible_response(response)}],
        add_generation_prompt=False))


def _right_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
    return ids.to(device), torch.tensor([len(r) for r in rows], device=device)


@torch.no_grad()
def score(rm: RewardModel, tok, prompts: list[str], responses: list[str], batch_size: int = 64) -> torch.Tensor:
    """Rewards [N] (fp32, cpu) of N (prompt, response) pairs."""
    device = next(rm.parameters()).device
    was_training = rm.training
    rm.eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        rows = [encode_conversation(tok, p, r) for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
        out.append(rm(*_right_pad(rows, tok.pad_id, device)).float().cpu())
    rm.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def reward_scorer(rm: RewardModel, tok) -> "Callable[[list[str], list[str]], list[float]]":
    """scorer(prompts, responses) = [σ(r(prompt, response)) ∈ (0, 1)], scored in batches of `score`: a reward
    model as an RL reward (R1 stage 4's general prompts: `nanoseek.r1.general.GeneralFamily(reward_scorer(rm,
    tok))`). σ puts it on the rule rewards' 0..1 scale. Errors are not caught: a failing reward model stops the
    run."""
    def scorer(prompts: list[str], responses: list[str]) -> list[float]:
        return torch.sigmoid(score(rm, tok, prompts, responses).double()).tolist()

    return scorer


# ---------------------------------------------------------------- data

def load_pairs(path: str | Path) -> list[dict]:
    """Preference pairs from JSONL; a bad line is a UserError naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"preference data {path} not found; pass a JSONL file of prompt/chosen/rejected records")
    pairs = []
    for n, rec in iter_jsonl(path):
        if not (isinstance(rec, dict) and all(isinstance(rec.get(k), str) for k in ("prompt", "chosen", "rejected"))):
            raise UserError(f'{path}:{n}: expected {{"prompt": str, "chosen": str, "rejected": str}}')
        pairs.append({"kind": str(rec.get("kind", "user")), **{k: rec[k] for k in ("prompt", "chosen", "rejected")}})
    if len(pairs) < 2:
        raise UserError(f"{path} holds {len(pairs)} preference pairs; need at least 2 (one to train, one held out)")
    return pairs


def encode_pairs(tok, pairs: list[dict], max_len: int) -> list[tuple[list[int], list[int], str]]:
    out = []
    for p in pairs:
        c, r = encode_conversation(tok, p["prompt"], p["chosen"]), encode_conversation(tok, p["prompt"], p["rejected"])
        if len(c) <= max_len and len(r) <= max_len:
            out.append((c, r, p["kind"]))
    return out


@torch.no_grad()
def pairwise_accuracy(rm: RewardModel, encoded, pad_id: int, batch_size: int = 64) -> dict:
    """{"accuracy", "n", "by_kind": {kind: accuracy}}: share of pairs with r_chosen > r_rejected."""
    device = next(rm.parameters()).device
    hits: dict[str, list[bool]] = {}
    for i in range(0, len(encoded), batch_size):
        chunk = encoded[i:i + batch_size]
        r = rm(*_right_pad([c for c, _, _ in chunk] + [x for _, x, _ in chunk], pad_id, device))
        for (_, _, kind), win in zip(chunk, (r[:len(chunk)] > r[len(chunk):]).tolist()):
            hits.setdefault(kind, []).append(win)
    flat = [h for v in hits.values() for h in v]
    return {"accuracy": sum(flat) / max(len(flat), 1), "n": len(flat),
            "by_kind": {k: sum(v) / len(v) for k, v in sorted(hits.items())}}


# ---------------------------------------------------------------- training

def train_reward_model(cfg: RewardModelConfig, out: str | Path, progress: bool = True,
                       generated: list[dict] | None = None) -> dict:
    """Train on the pairs, write `out/final` (backbone + head + tokenizer), return the held-out metrics.

    The pairs are `cfg.data.path`, else `generated` (the caller's generated pairs, e.g.
    `nanoseek.r1.general.preference_pairs(cfg.data.pairs, seed=cfg.train.seed)`: the generator sits a layer above)."""
    tc = cfg.train
    if not cfg.init:
        raise UserError("reward-model needs a backbone: pass --init MODEL_DIR (e.g. a pipeline's SFT model)")
    if not 0 < cfg.data.val_fraction < 1 or tc.steps < 1 or tc.batch_size < 1:
        raise UserError("reward model: data.val_fraction must be in (0, 1), train.steps and train.batch_size >= 1")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    out = Path(out)
    device = resolve_device(tc.device)
    backbone, tok_dir = load_init(cfg.init, device)
    tok = Tokenizer.load(tok_dir)
    if not cfg.data.path and generated is None:
        raise UserError("reward model: no pairs; set data.path to a JSONL of prompt/chosen/rejected pairs")
    pairs = load_pairs(cfg.data.path) if cfg.data.path else generated
    random.Random(tc.seed).shuffle(pairs)
    encoded = encode_pairs(tok, pairs, cfg.data.max_len)
    n_val = max(1, int(round(len(encoded) * cfg.data.val_fraction)))
    val, train = encoded[:n_val], encoded[n_val:]
    if not train:
        raise UserError(f"reward model: {len(encoded)} of {len(pairs)} pairs fit data.max_len={cfg.data.max_len}; "
                        "raise data.max_len or add pairs")
    seed_everything(tc.seed)
    rm = RewardModel(compile_for_training(backbone, tc.compile, device, dynamic=None)).to(device).float()
    rm.backbone.eval()                      # see the module docstring
    optimizer = build_optimizer(rm, cfg.optim)
    order = random.Random(tc.seed + 1)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with MetricsLogger(out, tc.steps, description="reward model", show=("loss", "accuracy"), progress=progress) as log:
        for step in steps_with_gc(range(tc.steps)):
            set_lr(optimizer, wsd_lr(step, tc.steps, cfg.optim))
            batch = order.sample(train, min(tc.batch_size, len(train)))
            r = rm(*_right_pad([c for c, _, _ in batch] + [x for _, x, _ in batch], tok.pad_id, device))
            rc, rr = r[:len(batch)], r[len(batch):]
            loss = bradley_terry_loss(rc, rr)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(rm.parameters(), cfg.optim.grad_clip or math.inf)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            log.log(step + 1, {"loss": loss.item(), "accuracy": (rc > rr).float().mean().item(),
                               "margin": (rc - rr).mean().item()})
    metrics = {"heldout": pairwise_accuracy(rm, val, tok.pad_id), "train": pairwise_accuracy(rm, train, tok.pad_id),
               "pairs": len(pairs), "used": len(encoded), "wall_s": time.perf_counter() - t0}
    save_reward_model(rm, tok_dir, out / "final", metrics)
    return metrics


def save_reward_model(rm: RewardModel, tok_dir: str | Path, path: str | Path, metrics: dict) -> None:
    with atomic_dir(path) as tmp:
        save_pretrained(rm.backbone, tmp / "backbone")
        for f in (tmp / "backbone").iterdir():
            f.rename(tmp / f.name)
        (tmp / "backbone").rmdir()
        (tmp / HEAD_DIR).mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in rm.head.state_dict().items()},
                  str(tmp / HEAD_DIR / "head.safetensors"))
        for f in Path(tok_dir).iterdir():
            if f.name.startswith("tokenizer"):
                shutil.copy2(f, tmp / f.name)
        atomic_write_json(tmp / INFO_FILE, metrics)


def load_reward_model(path: str | Path, device="cpu") -> tuple[RewardModel, object]:
    """(RewardModel in eval mode, tokenizer) from a directory written by `save_reward_model`."""
    path = Path(path)
    head = path / HEAD_DIR / "head.safetensors"
    if not head.is_file() and not (path / LEGACY_HEAD_FILE).is_file():
        raise UserError(f"{path} is not a reward model (no {HEAD_DIR}/); train one with `nanoseek reward-model`")
    backbone, tok = load_checkpoint(path, device)
    rm = RewardModel(backbone)
    try:
        state = load_file(str(head)) if head.is_file() else \
            torch.load(path / LEGACY_HEAD_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / corrupt file
        raise UserError(f"{path}: reward head unreadable ({type(e).__name__}); retrain or restore it") from None
    rm.head.load_state_dict(state)
    return rm.to(device).eval(), tok
