"""The run directory: refuse to overwrite a run, check a resumed run's config, write the resolved config and
tokenizer, export `final/`, and load the model a run starts from.

Layout: config.toml, tokenizer/, data/, metrics.jsonl, tb/, checkpoints/step-N/ (nanoseek.run.checkpoint),
final/ (HF model + tokenizer, loadable with `load_pretrained`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tomllib
from pathlib import Path

import torch

from nanoseek.errors import UserError
from nanoseek.files import atomic_dir, atomic_write_json, atomic_write_text, check_run_target, clean_stale_tmp, read_jsonl
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


@contextlib.contextmanager
def undo_failed_start(out: str | os.PathLike):
    """Leave `out` as it was when the block fails on bad input (a UserError) before the run wrote a checkpoint:
    what this attempt created in it (config.toml, tokenizer/, tb/, metrics.jsonl, eval/) is deleted, and `out`
    itself when the attempt created it, so the rerun with the fix needs no cleanup and no --resume. Entries
    that were there before are kept; a run that wrote a checkpoint is kept whole (it can be resumed)."""
    out = Path(out)
    existed = out.exists()
    before = set(out.iterdir()) if out.is_dir() else set()
    ckpt = latest_checkpoint(out) if out.is_dir() else None
    try:
        yield
    except UserError:
        if out.is_dir() and latest_checkpoint(out) == ckpt:
            if not existed:
                shutil.rmtree(out, ignore_errors=True)
            else:
                for p in set(out.iterdir()) - before:
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p, ignore_errors=True)
                    else:
                        p.unlink(missing_ok=True)
        raise


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_dtype(path: str | os.PathLike | None) -> torch.dtype | None:
    """The dtype an HF checkpoint's config.json records (`dtype`, or the older `torch_dtype`), None when it
    records none: a run from a bf16 checkpoint exports bf16, not its fp32 training copy."""
    if not path or not (Path(path) / "config.json").is_file():
        return None
    try:
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return DTYPES.get(cfg.get("dtype") or cfg.get("torch_dtype"))


def export_final(out: Path, model, tok, dtype: torch.dtype | None = None) -> Path:
    """`final/`: the HF model and its tokenizer, loadable with `load_pretrained`, `nanoseek eval` and
    transformers, and servable as is: config.json carries the tokenizer's bos/eos/pad ids, generation_config.json
    (the init checkpoint's, when it had one) lists every eos id (`Tokenizer.eos_ids`: the chat template's end of
    turn such as <|im_end|> included, so `generate()` stops there), the chat template travels in
    tokenizer_config.json, and the weights are written in `dtype` (`checkpoint_dtype` of the init; None = as
    trained)."""
    eos = tok.eos_ids
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": eos[0], "pad_token_id": tok.pad_id}
    generation = {**tok.generation_config, **ids, "eos_token_id": eos if len(eos) > 1 else eos[0]}
    with atomic_dir(out / "final") as tmp:
        save_pretrained(model, tmp, dtype=dtype, config_extra=ids)
        for f in (out / "tokenizer").iterdir():
            shutil.copy2(f, tmp / f.name)
        atomic_write_json(tmp / "generation_config.json", generation)
    return out / "final"


def load_init(path: str, device: torch.device):
    """(model, tokenizer dir) of an HF checkpoint to start from; UserError when it is not one."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"--init {path} is not a directory; pass a model directory such as runs/pretrain/final")
    return load_pretrained(p, device=str(device)), find_tokenizer(p)
