"""Checkpoints: `run_dir/checkpoints/step-N/` = an HF-format model + `trainer_state.pt`.

The model half is what `load_pretrained` reads (so any checkpoint is also a usable model, router biases
included: they are the `e_score_correction_bias` buffers); the trainer half is everything else a bit-exact
resume needs: optimizer moments, the step (the LR schedule is a pure function of it), the data iterator's
position and the python / numpy / torch RNG states. Each checkpoint directory is built under a temporary
name and renamed into place when complete, so a kill at any moment leaves either the old set of
checkpoints or the new one; the oldest beyond `keep_last` are then deleted.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from nanoseek.errors import UserError
from nanoseek.files import atomic_dir
from nanoseek.hf import save_pretrained

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                       "pos": np_state["state"]["pos"], "has_gauss": np_state["has_gauss"],
                       "gauss": np_state["gauss"]}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "has_gauss": n["has_gauss"], "gauss": n["gauss"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]}})
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """Steps of the complete checkpoints in `run_dir/checkpoints`, ascending."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir()
                  if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file())


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    steps = checkpoint_steps(run_dir)
    return Path(run_dir) / "checkpoints" / f"step-{steps[-1]}" if steps else None


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, trainer_state: dict,
                    keep_last: int) -> Path:
    """Write `checkpoints/step-{step}` atomically, then delete all but the newest `keep_last` (≥ 1)."""
    root = Path(run_dir) / "checkpoints"
    path = root / f"step-{step}"
    with atomic_dir(path) as tmp:
        save_pretrained(model, tmp)
        torch.save({"step": step, **trainer_state}, tmp / STATE_FILE)
    for old in checkpoint_steps(run_dir)[:-max(1, keep_last)]:
        shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    for stale in root.glob(".step-*"):  # temp dirs of a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    return path


def load_trainer_state(ckpt_dir: str | Path) -> dict:
    path = Path(ckpt_dir) / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} not found; point at a checkpoints/step-N directory written by nanoseek") from None
    except Exception as e:  # truncated / corrupt pickle
        raise UserError(f"{path} is unreadable ({type(e).__name__}); delete that checkpoint to resume "
                        "from the previous one") from None
