"""Hugging Face checkpoints on disk: `load_pretrained` and `save_pretrained` in the hub layout, and
`load_checkpoint` / `find_tokenizer` for a model directory together with its tokenizer.

Our parameter names already follow the hub (docs/INTERFACES.md), so this module is a thin, checked map.
Three places differ, and each is translated here and nowhere else:

* routed experts: the hub stores one `mlp.experts.{e}.{gate,up,down}_proj.weight` per expert (transformers
  >= 5 fuses them in memory, and may write `mlp.experts.gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I]);
  we hold the fused tensors, so we stack on load and split on save, and read either form.
* MTP (V3 §2.2): module k lives at hub layer `model.layers.{L+k}`, next to copies of the embedding and the
  output head (`embed_tokens`, `shared_head.head`) that the model shares; we check the copies on load and
  write them on save, as the released checkpoint does (vLLM / SGLang read them from there).
* FP8 (V3 §3.3): released weights are float8_e4m3fn with `<name>.weight_scale_inv` holding one scale per
  128x128 block; we dequantise them to the requested dtype on load.

Every problem with the user's files (missing config.json, unsupported model_type, a corrupt shard, a missing,
extra or mis-shaped tensor) is one `UserError` line naming the file or key and the fix.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nanoseek.config import DenseConfig, ModelConfig, _read_json, config_from_hf_dict
from nanoseek.errors import UserError
from nanoseek.files import atomic_dir, atomic_write_json
from nanoseek.model import build_model
from nanoseek.tokenizer import Tokenizer, check_vocab_fits

FP8_BLOCK = 128                            # V3 §3.3: weights are scaled per 128x128 block
MAX_SHARD_BYTES = 4 * 1024**3              # shard size on save, as the hub splits big checkpoints
INDEX = "model.safetensors.index.json"
_EXPERT_KEY = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight")
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.*)")
_V2_BIAS = re.compile(r"\.mlp\.gate\.e_score_correction_bias$")
_MTP_COPIES = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}


# ---------------------------------------------------------------- reading files

def _shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those named by the sharded index, else every *.safetensors."""
    index = path / INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} has no 'weight_map'; re-export the checkpoint or delete the index")
        files = [_inside(path, f, index) for f in sorted(set(map(str, weight_map.values())))]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise UserError(f"{path} holds no *.safetensors weights; point at a Hugging Face model directory")
    for f in files:
        if not f.is_file():
            raise UserError(f"{f.name} is named by {INDEX} but missing from {path}; download or copy it")
    return files


def _inside(path: Path, name: str, index: Path) -> Path:
    """Shard `name` of the index as a file directly inside checkpoint `path`: an index naming
    `../../outside.safetensors`, an absolute path or a link out of the directory is refused, so loading a
    checkpoint reads nothing but its own files."""
    f = path / name
    if Path(name).is_absolute() or Path(name).name != name or f.resolve().parent != path.resolve():
        raise UserError(f"{index} names shard {name[:80]!r} outside {path}; shards must be files in the "
                        "checkpoint directory itself")
    return f


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory (sharded or not), as stored."""
    tensors: dict[str, torch.Tensor] = {}
    for f in _shard_files(path):
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for key in st.keys():
                    if key in tensors:
                        raise UserError(f"{f.name}: tensor {key!r} also appears in another shard; remove the duplicate")
                    tensors[key] = st.get_tensor(key)
        except UserError:
            raise
        except Exception as e:  # SafetensorError, OSError, ...: a truncated or corrupt download
            raise UserError(f"{f}: not a readable safetensors file ({str(e).splitlines()[0]}); "
                            "re-download or re-save it") from None
    return tensors


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Block FP8 -> dtype: every 128x128 block of `weight` [out, in] times its scale [ceil(out/128), ceil(in/128)]."""
    out_f, in_f = weight.shape
    s = scale_inv.float().repeat_interleave(FP8_BLOCK, 0)[:out_f].repeat_interleave(FP8_BLOCK, 1)[:, :in_f]
    return (weight.float() * s).to(dtype)


def _dequantize_all(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, t in tensors.items():
        if key.endswith(".weight_scale_inv"):
            continue
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            scale_key = key + "_scale_inv"
            if scale_key not in tensors:
                raise UserError(f"FP8 tensor {key!r} has no {scale_key!r}; only block-scaled FP8 checkpoints are supported")
            s = tensors[scale_key]
            want = (math.ceil(t.shape[0] / FP8_BLOCK), math.ceil(t.shape[1] / FP8_BLOCK))
            if tuple(s.shape) != want:
                raise UserError(f"{scale_key!r} has shape {tuple(s.shape)}, expected {want} (one scale per "
                                f"{FP8_BLOCK}x{FP8_BLOCK} block); the checkpoint is not block-quantised as V3's")
            t = dequantize_fp8(t, s)
        out[key] = t
    stray = [k for k in tensors if k.endswith(".weight_scale_inv") and k[: -len("_scale_inv")] not in tensors]
    if stray:
        raise UserError(f"scale {stray[0]!r} has no weight; the checkpoint is incomplete, re-download it")
    return out


# ---------------------------------------------------------------- hub <-> nanoseek names

def _from_hub(tensors: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Hub keys -> our state-dict keys: MTP layers to `mtp.{k}.`, per-expert tensors stacked."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[tuple[int, str], torch.Tensor]] = defaultdict(dict)
    L = cfg.num_hidden_layers
    mtp_copies = []
    for key, t in tensors.items():
        if key.endswith("rotary_emb.inv_freq"):     # older exports store the rope table; we recompute it
            continue
        m = _LAYER_KEY.fullmatch(key)
        if isinstance(cfg, ModelConfig) and m and int(m[1]) >= L:
            prefix = f"mtp.{int(m[1]) - L}."
            if m[2] in _MTP_COPIES:
                mtp_copies.append((key, _MTP_COPIES[m[2]], t))
                continue
            key = prefix + m[2]
        m = _EXPERT_KEY.fullmatch(key)
        if m:
            experts[m[1]][int(m[2]), m[3]] = t
            continue
        out[key] = t
    for prefix, parts in experts.items():
        E, H, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        if len(parts) != 3 * E or max(e for e, _ in parts) >= E:
            raise UserError(f"{_to_hub_name(prefix, cfg)}: checkpoint has {len(parts)} per-expert tensors, "
                            f"config.json implies n_routed_experts={E} x 3; the checkpoint and config do not match")
        for (e, p), t in parts.items():
            want = (H, inter) if p == "down" else (inter, H)
            if tuple(t.shape) != want:
                raise UserError(f"tensor {_to_hub_name(f'{prefix}.{e}.{p}_proj.weight', cfg)!r} has shape "
                                f"{tuple(t.shape)}, config.json implies {want}; the checkpoint and config do not match")
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([parts[e, "gate"], parts[e, "up"]]) for e in range(E)])
        out[f"{prefix}.down_proj"] = torch.stack([parts[e, "down"] for e in range(E)])
    for key, shared, t in mtp_copies:  # the MTP's stored embedding / head must be the shared ones
        if shared in out and (out[shared].shape != t.shape or not torch.equal(out[shared], t.to(out[shared].dtype))):
            raise UserError(f"{key!r} differs from {shared!r}, but the MTP module shares it (V3 §2.2); "
                            "this checkpoint was not trained with a shared head, it cannot be loaded as DeepSeek-V3")
    return out


def _to_hub_name(key: str, cfg) -> str:
    m = re.match(r"mtp\.(\d+)\.(.*)", key)
    return f"model.layers.{cfg.num_hidden_layers + int(m[1])}.{m[2]}" if m else key


def _to_hub(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Our state dict -> hub keys: experts split per expert, MTP as layer L+k with its embedding/head copies."""
    out = {}
    for key, t in state.items():
        if cfg.tie_word_embeddings and key == "lm_head.weight":
            continue                                           # tied: the hub stores the embedding only
        if cfg.model_type == "deepseek_v2" and _V2_BIAS.search(key) and not t.any():
            continue                                           # V2 checkpoints carry no (zero) balancing bias
        key = _to_hub_name(key, cfg)
        if key.endswith(".mlp.experts.gate_up_proj"):          # [E, 2I, H], gate rows first
            prefix, inter = key[: -len(".gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.gate_proj.weight"] = t[e, :inter]
                out[f"{prefix}.{e}.up_proj.weight"] = t[e, inter:]
        elif key.endswith(".mlp.experts.down_proj"):           # [E, H, I]
            prefix = key[: -len(".down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}.{e}.down_proj.weight"] = t[e]
        else:
            out[key] = t
    if isinstance(cfg, ModelConfig):
        for k in range(cfg.num_nextn_predict_layers):
            for copy, shared in _MTP_COPIES.items():
                src = "model.embed_tokens.weight" if cfg.tie_word_embeddings else shared
                out[f"model.layers.{cfg.num_hidden_layers + k}.{copy}"] = state[src]
    return out


# ---------------------------------------------------------------- public API

def load_config(path: str | Path) -> ModelConfig | DenseConfig:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; point at a Hugging Face model directory (config.json + *.safetensors)")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json; point at a Hugging Face model directory")
    return config_from_hf_dict(_read_json(path / "config.json"))


def load_pretrained(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32):
    """Read a local HF directory (deepseek_v3 / deepseek_v2 / qwen2 / qwen3 / llama) into a nanoseek model.

    Parameters are cast to `dtype`; buffers keep their own dtype (the router bias stays fp32).
    """
    path = Path(path)
    cfg = load_config(path)
    tensors = _dequantize_all(read_safetensors(path))
    if isinstance(cfg, ModelConfig) and cfg.num_nextn_predict_layers and not any(
            k.startswith(f"model.layers.{cfg.num_hidden_layers}.") for k in tensors):
        # transformers saves no MTP weights but keeps num_nextn_predict_layers: load the trunk alone
        warnings.warn(f"{path}: config.json has num_nextn_predict_layers={cfg.num_nextn_predict_layers} but the "
                      "checkpoint stores no MTP layer; loading without MTP")
        cfg = cfg.replace(num_nextn_predict_layers=0)
    state = _from_hub(tensors, cfg)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)                    # tied: the head is the embedding
    optional = _V2_BIAS if cfg.model_type == "deepseek_v2" else None  # V2 has no balancing bias: zeros

    with torch.device("meta"):
        model = build_model(cfg)
        for p in model.parameters():
            p.data = p.data.to(dtype)
    expected = model.state_dict()
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    for key, ref in expected.items():
        if key in tied:
            continue
        if key not in state and optional and optional.search(key):
            state[key] = torch.zeros(ref.shape)
        if key not in state:
            raise UserError(f"{path}: checkpoint lacks tensor {_to_hub_name(key, cfg)!r} required by its config.json; "
                            "the checkpoint and config do not match")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise UserError(f"{path}: tensor {_to_hub_name(key, cfg)!r} has shape {tuple(state[key].shape)}, "
                            f"config.json implies {tuple(ref.shape)}; the checkpoint and config do not match")
    extra = sorted(set(state) - set(expected))
    if extra and all(".lora_A." in k or ".lora_B." in k for k in extra):
        raise UserError(f"{path} holds LoRA adapter tensors ({extra[0]!r}): it is a checkpoint of a LoRA run; load "
                        "the run's final/ (adapter merged) or its adapter/ with PEFT, or --resume the run")
    if extra:
        raise UserError(f"{path}: unexpected tensor {_to_hub_name(extra[0], cfg)!r} (and {len(extra) - 1} more) "
                        f"for model_type {cfg.model_type}; check config.json (layers, experts, MTP depth)")

    model.to_empty(device=device)
    if cfg.tie_word_embeddings:                                # to_empty makes new tensors: tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    with torch.no_grad():
        for key, t in model.state_dict().items():             # views of the parameters and buffers
            if key in tied:
                continue
            t.copy_(state[key])
        # what is not stored is runtime state (zeroed: expert-load counters) or derived from the config
        # (recomputed: rope tables)
        for module in model.modules():
            if module._non_persistent_buffers_set:
                for name in module._non_persistent_buffers_set:
                    module._buffers[name].zero_()
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
    return model


def save_pretrained(model, path: str | Path, dtype: torch.dtype | None = None,
                    max_shard_bytes: int = MAX_SHARD_BYTES, config_extra: dict | None = None) -> None:
    """Write `model` as a hub-layout HF directory (config.json + safetensors), atomically. config_extra: keys
    config.json carries beside the architecture (bos/eos/pad token ids: transformers reads them)."""
    cfg = model.config
    buffers = {_to_hub_name(name, cfg) for name, _ in model.named_buffers()}  # kept in their dtype (fp32 bias)
    tensors = {}
    for key, t in _to_hub(model.state_dict(), cfg).items():
        t = t.detach().to("cpu")
        if dtype is not None and t.is_floating_point() and key not in buffers:
            t = t.to(dtype)
        tensors[key] = t.clone().contiguous()                  # views of fused experts / tied copies: own storage
    saved_dtype = dtype or model.lm_head.weight.dtype
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = hf["dtype"] = str(saved_dtype).removeprefix("torch.")
    hf.update({k: v for k, v in (config_extra or {}).items() if v is not None})

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors, key=_natural_key):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    with atomic_dir(path) as tmp:
        atomic_write_json(tmp / "config.json", hf)
        names = ["model.safetensors"] if len(shards) == 1 else \
            [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
        if len(shards) > 1:
            weight_map = {key: name for name, shard in zip(names, shards) for key in shard}
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            atomic_write_json(tmp / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _natural_key(key: str) -> list:
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", key)]


# ---------------------------------------------------------------- a checkpoint with its tokenizer

def find_tokenizer(path: str | Path) -> Path:
    """The tokenizer of a checkpoint: in the directory itself, else in a `tokenizer/` folder of it or of
    one of its two parents (a run directory keeps one tokenizer for all of `checkpoints/step-N`)."""
    path = Path(path)
    for d in (path, path.parent, path.parent.parent):
        for cand in (d, d / "tokenizer"):
            if (cand / "tokenizer.json").is_file():
                return cand
    raise UserError(f"no tokenizer.json in {path}, its parents or their tokenizer/ folders; copy the "
                    f"tokenizer next to the checkpoint (nanoseek tokenizer --out {path})")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", inference: bool = False):
    """(model in eval mode, tokenizer) from an HF-format directory nanoseek can load. inference=True (models
    that only generate): bf16 weights on CUDA, as R1 is served, so decoding runs CUDA graphs with the
    grouped expert kernel; fp32 sampling there would sync with the host for every expert of every token."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} is not a directory; pass a model directory such as RUN/checkpoints/step-N")
    tokenizer = Tokenizer.load(find_tokenizer(path))
    model = load_pretrained(path, device=str(device)).eval()
    if inference and next(model.parameters()).is_cuda:
        model = model.to(torch.bfloat16)
    check_vocab_fits(len(tokenizer), model.config.vocab_size)
    return model, tokenizer
