"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", §4.1) for dense models,
written in PEFT's adapter format: the files PEFT loads (tests/test_lora.py), and vLLM / SGLang read for LoRA serving.

A targeted projection W [out, in] keeps its weight frozen and gains a rank-r update:

    y = x W^T + b + (α / r) · B A dropout(x)          A [r, in] (Kaiming-uniform), B [out, r] (zeros)

so training starts exactly at the base model and the optimizer holds only A and B (2·r·(in + out) numbers a
projection instead of in·out). The projections are PEFT's names for Llama / Qwen2 / Qwen3 layers
(`q_proj k_proj v_proj o_proj gate_proj up_proj down_proj`); A and B live under the projection as
`lora_A.weight` / `lora_B.weight`, as in PEFT, so the adapter file is our parameter names with PEFT's
`base_model.model.` prefix.

Run layout with `lora.r > 0`: `adapter/` (adapter_config.json + adapter_model.safetensors, the product a user
serves next to the base), `final/` (the adapter merged into the base, W += (α / r) B A: a plain model for
`nanoseek eval`, later stages and transformers). The checkpoints `checkpoints/step-N` hold the base and the
adapter tensors under their own names; the frozen base equals `--init`, so `--resume` rebuilds the model from
`--init` plus the checkpoint's adapter tensors. GRPO's KL reference is `BaseModel(model)`: the same weights with
the adapters switched off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from nanoseek.errors import UserError
from nanoseek.files import atomic_dir, atomic_write_json
from nanoseek.hf import read_safetensors
from nanoseek.model import DenseForCausalLM
from nanoseek.recipe import Range

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."                  # PEFT's wrapper of the causal LM, in front of our names
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class LoRAConfig:
    """`[lora]`: PEFT's LoraConfig as r, lora_alpha, lora_dropout, target_modules."""
    r: int = 0                        # adapter rank; 0 = off (full fine-tuning). 8-64 is usual
    alpha: float = 16.0               # PEFT lora_alpha: the update is scaled by alpha / r
    dropout: float = 0.0              # PEFT lora_dropout, on the adapter's input only
    target_modules: list[str] = field(default_factory=lambda: list(PROJECTIONS))

    CHECKS: ClassVar[dict] = {"r": Range(0), "alpha": Range(0), "dropout": Range(0, 1, open_hi=True)}

    def __post_init__(self) -> None:
        bad = [m for m in self.target_modules if m not in PROJECTIONS]
        if bad or not self.target_modules:
            what = f"{bad[0]!r} is not a projection" if bad else "the list is empty"
            raise UserError(f"lora.target_modules: {what}; choose from {', '.join(PROJECTIONS)}")

    @property
    def enabled(self) -> bool:
        return self.r > 0


class LoRALinear(nn.Linear):
    """An nn.Linear (its weight and bias untouched, frozen) with the rank-r update beside it. Made by class swap
    in `apply_lora`, so the base parameter names stay those of the hub checkpoint."""

    lora_A: nn.Linear                 # [r, in]
    lora_B: nn.Linear                 # [out, r]
    scaling: float
    lora_dropout: nn.Module
    adapter_off = False               # set inside `BaseModel` calls: the frozen base alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.adapter_off:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


class BaseModel:
    """The frozen base under a LoRA model, called like a model: GRPO's KL reference (the initial policy, since
    B starts at zero and the base never changes) without a second copy of the weights, as TRL does with PEFT's
    `disable_adapter()`."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        layers = [m for m in self.model.modules() if isinstance(m, LoRALinear)]
        for m in layers:
            m.adapter_off = True
        try:
            return self.model(*args, **kwargs)
        finally:
            for m in layers:
                m.adapter_off = False


def apply_lora(model: nn.Module, cfg: LoRAConfig, seed: int = 0) -> nn.Module:
    """Freeze `model` and add adapters to its `cfg.target_modules` projections (in place; returns the model).
    A is drawn from its own generator seeded by `seed`, so the start does not depend on what drew before."""
    if not cfg.enabled:
        return model
    if not isinstance(model, DenseForCausalLM):
        raise UserError(f"lora supports dense models (llama, qwen2, qwen3), not {type(model).__name__}; "
                        "set lora.r=0 for full fine-tuning")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if name.rsplit(".", 1)[-1] not in cfg.target_modules:
            continue
        if type(m) is not nn.Linear:
            raise UserError(f"lora: {name} is a {type(m).__name__}, not a plain Linear; apply LoRA to the model "
                            "as loaded")
        w = m.weight
        m.__class__ = LoRALinear
        a = torch.empty(cfg.r, m.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)   # PEFT's init_lora_weights=True: A random,
        m.lora_A = nn.Linear(m.in_features, cfg.r, bias=False, device=w.device, dtype=w.dtype)
        m.lora_B = nn.Linear(cfg.r, m.out_features, bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            m.lora_A.weight.copy_(a)
            m.lora_B.weight.zero_()                                   # B zero: the adapter starts as the base
        m.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        m.scaling = cfg.alpha / cfg.r
    model.lora_config = cfg
    return model


def resume_adapter(model: nn.Module, ckpt: str | Path) -> nn.Module:
    """Load the adapter tensors of LoRA-run checkpoint `ckpt` into `model` (the --init base with `apply_lora`'s
    adapters): the base is frozen, so the checkpoint's base tensors are --init's and only the adapters are read."""
    stored = {k: t for k, t in read_safetensors(Path(ckpt)).items() if ".lora_A." in k or ".lora_B." in k}
    load_adapter_state(model, stored, ckpt)
    return model


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under our names: `model.layers.N.self_attn.q_proj.lora_A.weight` -> [r, in], ..."""
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def load_adapter_state(model: nn.Module, tensors: dict[str, torch.Tensor], source) -> None:
    """Copy adapter tensors (our names) into `model`'s adapters; every one must be there with its shape."""
    own = adapter_state(model)
    if set(tensors) != set(own):
        missing = sorted(set(own) - set(tensors)) or sorted(set(tensors) - set(own))
        raise UserError(f"{source}: its adapter tensors do not match lora.r / lora.target_modules (first "
                        f"difference: {missing[0]!r}); resume with the settings the run started with")
    with torch.no_grad():
        for k, t in own.items():
            if t.shape != tensors[k].shape:
                raise UserError(f"{source}: adapter tensor {k!r} has shape {tuple(tensors[k].shape)}, lora.r implies "
                                f"{tuple(t.shape)}; resume with the settings the run started with")
            t.copy_(tensors[k])


def save_adapter(model: nn.Module, path: str | Path, base_model: str = "") -> Path:
    """Write the adapters as a PEFT adapter directory (atomically): `PeftModel.from_pretrained(base, path)`,
    vLLM's `LoRARequest` and `merge_and_unload()` read it. base_model: recorded as base_model_name_or_path."""
    cfg: LoRAConfig = model.lora_config
    tensors = {PEFT_PREFIX + k: t.detach().to("cpu").contiguous() for k, t in adapter_state(model).items()}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base_model),
        "r": cfg.r, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.target_modules), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    with atomic_dir(path) as tmp:
        atomic_write_json(tmp / ADAPTER_CONFIG, config)
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return Path(path)


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, W += (α / r) B A (in fp32), and drop the adapters: a plain
    model with the adapted model's outputs (in place; returns the model)."""
    for m in model.modules():
        if isinstance(m, LoRALinear):
            delta = (m.lora_B.weight.float() @ m.lora_A.weight.float()) * m.scaling      # [out, in]
            m.weight.copy_((m.weight.float() + delta).to(m.weight.dtype))
            del m.lora_A, m.lora_B, m.lora_dropout
            m.__class__ = nn.Linear
    model.__dict__.pop("lora_config", None)
    return model


def finish_lora(model: nn.Module, run_dir: str | Path, base_model: str) -> nn.Module:
    """End of a LoRA run: `run_dir/adapter` in PEFT's format, then the merged model for `final/`."""
    if getattr(model, "lora_config", None) is None:
        return model
    save_adapter(model, Path(run_dir) / "adapter", base_model)
    return merge_lora(model)
