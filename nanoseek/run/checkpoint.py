"""Checkpoints: `run_dir/checkpoints/step-N/` = an HF-format model + `trainer_state/` (safetensors + JSON).

The model half is what `load_pretrained` reads (so any checkpoint is also a usable model, router biases
included: they are the `e_score_correction_bias` buffers); the trainer half is everything else a bit-exact
resume needs: optimizer moments, the step (the LR schedule is a pure function of it), the data iterator's
position and the python / numpy / torch RNG states. Each checkpoint directory is built under a temporary
name and renamed into place when complete, so a kill at any moment leaves either the old set of
checkpoints or the new one; the oldest beyond `keep_last` are then deleted. The trainer state is stored as
safetensors + JSON (`save_state`), so resuming unpickles nothing.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from nanoseek.errors import UserError
from nanoseek.files import atomic_dir
from nanoseek.hf import save_pretrained

STATE_DIR = "trainer_state"          # state.json + tensors.safetensors: no pickle is written or read
LEGACY_STATE_FILE = "trainer_state.pt"   # checkpoints of earlier versions (read with torch's weights_only loader)
_STEP_DIR = re.compile(r"^step-(\d+)$")


def save_state(state: dict, path: Path) -> None:
    """Write a nested state (optimizer moments, RNG states, data position) as directory `path`:
    `tensors.safetensors` holds every tensor, `state.json` the structure with each tensor replaced by its
    name. Tuples and dicts with non-string keys (optimizer states keyed by parameter index) are tagged so
    `load_state` rebuilds them exactly: a resumed run stays bit for bit the uninterrupted one."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def encode(obj):
        if isinstance(obj, torch.Tensor):
            t = obj.detach().to("cpu").contiguous()
            if t.numel() and t.data_ptr() in seen:      # safetensors refuses two names for one storage
                t = t.clone()
            if t.numel():
                seen.add(t.data_ptr())
            name = f"t{len(tensors)}"
            tensors[name] = t
            return {"__tensor__": name}
        if isinstance(obj, tuple):
            return {"__tuple__": [encode(v) for v in obj]}
        if isinstance(obj, list):
            return [encode(v) for v in obj]
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: encode(v) for k, v in obj.items()}
            return {"__items__": [[encode(k), encode(v)] for k, v in obj.items()]}
        if isinstance(obj, np.generic):
            return obj.item()
        if obj is None or isinstance(obj, (bool, int, float, str)):
            return obj
        raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")

    tree = encode(state)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "tensors.safetensors"))
    (path / "state.json").write_text(json.dumps(tree), encoding="utf-8")


def load_state(path: Path) -> dict:
    """Inverse of `save_state`."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "tensors.safetensors"))
    tree = json.loads((path / "state.json").read_text(encoding="utf-8"))

    def decode(obj):
        if isinstance(obj, list):
            return [decode(v) for v in obj]
        if isinstance(obj, dict):
            if "__tensor__" in obj:
                return tensors[obj["__tensor__"]]
            if "__tuple__" in obj:
                return tuple(decode(v) for v in obj["__tuple__"])
            if "__items__" in obj:
                return {decode(k): decode(v) for k, v in obj["__items__"]}
            return {k: decode(v) for k, v in obj.items()}
        return obj

    return decode(tree)


def _has_state(ckpt: Path) -> bool:
    return (ckpt / STATE_DIR / "state.json").is_file() or (ckpt / LEGACY_STATE_FILE).is_file()


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
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
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
                  if (m := _STEP_DIR.match(p.name)) and _has_state(p))


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
        save_state({"step": step, **trainer_state}, tmp / STATE_DIR)
    for old in checkpoint_steps(run_dir)[:-max(1, keep_last)]:
        shutil.rmtree(root / f"step-{old}", ignore_errors=True)
    for stale in root.glob(".step-*"):  # temp dirs of a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    return path


def load_trainer_state(ckpt_dir: str | Path) -> dict:
    ckpt_dir = Path(ckpt_dir)
    path = ckpt_dir / STATE_DIR
    try:
        if not path.is_dir() and (ckpt_dir / LEGACY_STATE_FILE).is_file():    # written before safetensors states
            path = ckpt_dir / LEGACY_STATE_FILE
            return torch.load(path, map_location="cpu", weights_only=True)
        return load_state(path)
    except FileNotFoundError:
        raise UserError(f"{path} not found; point at a checkpoints/step-N directory written by nanoseek") from None
    except Exception as e:  # truncated / corrupt file
        raise UserError(f"{path} is unreadable ({type(e).__name__}); delete that checkpoint to resume "
                        "from the previous one") from None
