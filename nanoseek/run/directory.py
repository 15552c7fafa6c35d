"""The run directory: refuse to overwrite a run, check a resumed run's config, write the resolved config and
tokenizer, export `final/`, and load the model a run starts from.

Layout: config.toml, tokenizer/, data/, metrics.jsonl, tb/, checkpoints/step-N/ (nanoseek.run.checkpoint),
final/ (HF model + tokenizer, loadable with `load_pretrained`).
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

import torch

from nanoseek.errors import UserError
from nanoseek.files import atomic_dir, atomic_write_text, check_run_target, clean_stale_tmp, read_jsonl
from nanoseek.hf import find_tokenizer, load_pretrained, save_pretrained
from nanoseek.recipe import to_toml
from nanoseek.run.checkpoint import latest_checkpoint


# Settings a resumed run may change: how long to train, how often to evaluate and checkpoint, whether to
# compile, the CPU threads, and the parallel layout (checkpoints are single-device files, so any layout
# resumes any other).
RESUMABLE_CHANGES = ("train.steps", "train.compile", "train.threads", "eval.", "checkpoint.", "parallel.")


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
    with atomic_dir(out / "final") as tmp:
        save_pretrained(model, tmp)
        for f in (out / "tokenizer").iterdir():
            shutil.copy2(f, tmp / f.name)
    return out / "final"


def load_init(path: str, device: torch.device):
    """(model, tokenizer dir) of an HF checkpoint to start from; UserError when it is not one."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"--init {path} is not a directory; pass a model directory such as runs/pretrain/final")
    return load_pretrained(p, device=str(device)), find_tokenizer(p)
