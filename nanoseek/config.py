"""Model configurations with Hugging Face field names, presets, and validation.

`ModelConfig` mirrors transformers' `DeepseekV3Config` (and the hub's config.json) field for field, so
`config.json` round-trips: `ModelConfig.from_hf_dict(json.load(...))` then `.to_hf_dict()`. `DenseConfig`
does the same for Llama/Qwen2/Qwen3-style decoders (distillation students and user checkpoints).

One dial sets the size: `ModelConfig.preset(name)` with `tiny` (CPU default), `small` (one GPU, the
reference shape of docs/DESIGN.md §8), `deepseek-v2-lite` and `deepseek-v3` (the real 671B shape, for
accounting on the meta device).
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanoseek.errors import UserError

# Hub keys we read but do not need (transformers bookkeeping, quantisation metadata, auto_map, ...).
_IGNORED_HF_KEYS = {
    "architectures", "auto_map", "torch_dtype", "dtype", "transformers_version", "model_type",
    "use_cache", "pretraining_tp", "output_router_logits", "initializer_range", "attention_dropout",
    "quantization_config", "_name_or_path", "bos_token_id", "eos_token_id", "pad_token_id",
    "aux_loss_alpha", "seq_aux", "ep_size", "moe_layer_freq", "topk_method", "hidden_act",
    "num_key_value_heads", "rope_interleave", "attention_bias", "use_sliding_window", "sliding_window",
    "max_window_layers", "layer_types", "head_dim", "mlp_bias", "return_dict", "output_attentions",
    "output_hidden_states", "tie_encoder_decoder", "is_encoder_decoder", "chunk_size_feed_forward",
    "mtp_loss_scaling_factor", "qk_head_dim", "id2label", "label2id", "problem_type",
}


@dataclass
class ModelConfig:
    """DeepSeek-V3 architecture (V3 report §2). Field names are Hugging Face's."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384          # dense FFN width (first_k_dense_replace layers)
    moe_intermediate_size: int = 64       # width of each routed / shared expert
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    n_shared_experts: int = 1
    n_routed_experts: int = 16
    num_experts_per_tok: int = 4
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"         # "sigmoid" (V3) or "softmax" (V2)
    first_k_dense_replace: int = 1
    q_lora_rank: int | None = 64          # None = plain q_proj (V2-Lite)
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None      # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6
    num_nextn_predict_layers: int = 1     # MTP depth D (V3 §2.2)
    tie_word_embeddings: bool = False
    model_type: str = field(default="deepseek_v3", repr=False)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return max(0, self.num_hidden_layers - self.first_k_dense_replace)

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace

    # ---- validation ----
    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise UserError(f"model config: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                     "max_position_embeddings", "moe_intermediate_size", "intermediate_size"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.scoring_func not in ("sigmoid", "softmax"):
            bad(f"scoring_func must be 'sigmoid' or 'softmax', got {self.scoring_func!r}")
        if self.qk_rope_head_dim % 2:
            bad(f"qk_rope_head_dim must be even for rotary pairs, got {self.qk_rope_head_dim}")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            bad(f"q_lora_rank must be positive or null, got {self.q_lora_rank}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            bad(f"first_k_dense_replace={self.first_k_dense_replace} must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        if self.num_moe_layers:
            if self.n_routed_experts <= 0:
                bad(f"n_routed_experts must be positive, got {self.n_routed_experts}")
            if not 0 < self.num_experts_per_tok <= self.n_routed_experts:
                bad(f"num_experts_per_tok={self.num_experts_per_tok} must be in [1, n_routed_experts={self.n_routed_experts}]")
            if self.n_group <= 0 or self.n_routed_experts % self.n_group:
                bad(f"n_routed_experts={self.n_routed_experts} must be divisible by n_group={self.n_group}")
            if not 0 < self.topk_group <= self.n_group:
                bad(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1 and per_group < 2:
                bad(f"each of the n_group={self.n_group} groups needs at least 2 experts (group score = sum of top-2)")
            if self.num_experts_per_tok > self.topk_group * per_group:
                bad(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in the kept groups "
                    f"(topk_group={self.topk_group} x {per_group}); raise topk_group or lower num_experts_per_tok")
        if self.n_shared_experts < 0 or self.num_nextn_predict_layers < 0:
            bad("n_shared_experts and num_nextn_predict_layers must be >= 0")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("yarn", "default", None):
                bad(f"rope_scaling type {kind!r} is not supported; use 'yarn' or null")
            if kind == "yarn" and float(self.rope_scaling.get("factor", 1.0)) < 1.0:
                bad(f"rope_scaling.factor must be >= 1, got {self.rope_scaling.get('factor')}")

    # ---- presets ----
    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**PRESETS[name])

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    # ---- Hugging Face config.json ----
    @classmethod
    def from_hf_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        mt = d.get("model_type", "deepseek_v3")
        if mt not in ("deepseek_v3", "deepseek_v2"):
            raise UserError(f"config model_type {mt!r} is not a DeepSeek model; use DenseConfig for llama/qwen2/qwen3")
        _check_rope_tables(d)
        rp = d.pop("rope_parameters", None)          # transformers >= 5 folds theta + scaling together
        if rp:
            d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            if rp.get("rope_type", "default") != "default" and not d.get("rope_scaling"):
                d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        if "num_mtp_layers" in d:
            d.setdefault("num_nextn_predict_layers", d.pop("num_mtp_layers"))
        if mt == "deepseek_v2":
            d.setdefault("scoring_func", "softmax")
            d.setdefault("num_nextn_predict_layers", 0)
        if d.get("rope_scaling") and "rope_type" in d["rope_scaling"] and "type" not in d["rope_scaling"]:
            d["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in d["rope_scaling"].items()}
        if d.get("rope_scaling") and d["rope_scaling"].get("type") == "default":
            d["rope_scaling"] = None
        for k in ("n_group", "topk_group"):
            if d.get(k) is None and k in d:
                d[k] = 1
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields - _IGNORED_HF_KEYS)
        if unknown:
            raise UserError(f"config.json: unknown key {unknown[0]!r} for a DeepSeek model; remove it or check the model_type")
        kw = _check_hf_types(cls, {k: v for k, v in d.items() if k in fields and k != "model_type"})
        try:
            return cls(**kw, model_type=mt)
        except TypeError as e:
            raise UserError(f"config.json: {e}") from None

    def to_hf_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(
            model_type=self.model_type,
            architectures=["DeepseekV3ForCausalLM" if self.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"],
            num_key_value_heads=self.num_attention_heads,
            hidden_act="silu",
            topk_method=("noaux_tc" if self.scoring_func == "sigmoid"
                         else "group_limited_greedy" if self.n_group > 1 else "greedy"),
            rope_interleave=True,
            attention_bias=False,
            torch_dtype="float32",
        )
        if self.rope_scaling is None:
            d.pop("rope_scaling")
        return d

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        return cls.from_hf_dict(_read_json(path))


@dataclass
class DenseConfig:
    """Llama / Qwen2 / Qwen3-style dense decoder (GQA, SwiGLU, RMSNorm, RoPE with half-split pairs).

    The three differ only in the attention's extras: Qwen2 has q/k/v biases; Qwen3 has none but RMS-normalises
    each head of q and k before RoPE (`q_norm` / `k_norm`, [head_dim] gains), and its head_dim is its own
    field (Qwen3-0.6B: 16 heads x 128 = 2048 > hidden 1024)."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None           # default hidden_size // num_attention_heads
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False          # Qwen2: bias on q/k/v projections (Llama / Qwen3: on q/k/v/o when true)
    tie_word_embeddings: bool = False
    model_type: str = "llama"             # "llama", "qwen2" or "qwen3" (per-head q/k RMSNorm)

    def __post_init__(self) -> None:
        if self.model_type == "qwen2":
            self.attention_bias = True
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        def bad(msg: str) -> None:
            raise UserError(f"dense model config: {msg}")
        if self.model_type not in DENSE_TYPES:
            bad(f"model_type must be one of {', '.join(DENSE_TYPES)}, got {self.model_type!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            bad(f"num_attention_heads={self.num_attention_heads} must be divisible by num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            bad(f"head_dim must be even for rotary pairs, got {self.head_dim}")

    @property
    def qk_norm(self) -> bool:
        """Qwen3: RMSNorm over head_dim on every query and key head, before RoPE."""
        return self.model_type == "qwen3"

    def replace(self, **changes: Any) -> "DenseConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_dict(cls, d: dict) -> "DenseConfig":
        d = dict(d)
        mt = d.get("model_type")
        if mt not in DENSE_TYPES:
            raise UserError(f"config model_type {mt!r} is not supported; supported: {SUPPORTED}")
        _check_rope_tables(d)
        rp = d.pop("rope_parameters", None)
        if rp:
            d.setdefault("rope_theta", rp.get("rope_theta", 10000.0))
            if rp.get("rope_type", "default") != "default" and not d.get("rope_scaling"):
                d["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
        if d.get("num_key_value_heads") is None:
            d["num_key_value_heads"] = d.get("num_attention_heads")
        if mt == "qwen3" and d.get("head_dim") is None:
            d["head_dim"] = 128                      # Qwen3Config's default, not hidden_size // heads
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in fields}
        kw["model_type"] = mt
        if mt == "qwen2":
            kw.pop("attention_bias", None)
        kw = _check_hf_types(cls, kw)
        try:
            return cls(**kw)
        except TypeError as e:
            raise UserError(f"config.json: {e}") from None

    def to_hf_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(
            architectures=[DENSE_TYPES[self.model_type]],
            hidden_act="silu",
            torch_dtype="float32",
        )
        if self.model_type == "qwen2":
            d.pop("attention_bias")
        if self.rope_scaling is None:
            d.pop("rope_scaling")
        return d


DENSE_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SUPPORTED = "deepseek_v3, deepseek_v2, " + ", ".join(DENSE_TYPES)


def config_from_hf_dict(d: dict) -> ModelConfig | DenseConfig:
    """Dispatch on model_type: DeepSeek → ModelConfig, llama/qwen2/qwen3 → DenseConfig."""
    if not isinstance(d, dict):
        raise UserError("config.json must hold a JSON object")
    mt = d.get("model_type")
    if mt in ("deepseek_v3", "deepseek_v2"):
        return ModelConfig.from_hf_dict(d)
    if mt in DENSE_TYPES:
        return DenseConfig.from_hf_dict(d)
    raise UserError(f"config model_type {mt!r} is not supported; supported: {SUPPORTED}")


_EXPECTED = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object"}
_ROPE_NUMBERS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                 "mscale_all_dim", "attention_factor")


def _check_rope_tables(d: dict) -> None:
    """`rope_scaling` / `rope_parameters` are read as tables before the field checks run: an object or null."""
    for key in ("rope_scaling", "rope_parameters"):
        if d.get(key) is not None and not isinstance(d[key], dict):
            raise UserError(f"config.json: \"{key}\" must be an object or null, got {json.dumps(d[key])[:40]}; "
                            "fix config.json")


def _check_hf_types(cls, kw: dict) -> dict:
    """config.json values checked against `cls`'s field types before any arithmetic sees them: one line naming
    the key and the expected type (`"num_hidden_layers": 4.5`, `"hidden_size": "128"` or null, `"rope_scaling":
    "yarn"`, a string factor). Integral floats (4.0) become ints, as transformers reads them."""
    hints = typing.get_type_hints(cls)
    out = dict(kw)
    for key, value in kw.items():
        args = typing.get_args(hints[key])
        optional = type(None) in args
        tp = next(a for a in args if a is not type(None)) if args else hints[key]
        if value is None and optional:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = {int: number and float(value).is_integer(),
              float: number and math.isfinite(value),
              bool: isinstance(value, bool), str: isinstance(value, str), dict: isinstance(value, dict)}.get(tp, True)
        if not ok:
            shown = json.dumps(value)[:40] if not isinstance(value, int) or abs(value) < 10 ** 40 else "a huge integer"
            raise UserError(f"config.json: \"{key}\" must be {_EXPECTED[tp]}{' or null' if optional else ''}, "
                            f"got {shown}; fix config.json")
        if tp is int:
            out[key] = int(value)
        if key == "rope_scaling" and value is not None:
            for k in _ROPE_NUMBERS:
                v = value.get(k)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                    raise UserError(f"config.json: \"rope_scaling.{k}\" must be a number, got {json.dumps(v)[:40]}; "
                                    "fix config.json")
    return out


def _read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} not found; point at a model directory that holds config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e}); restore or re-export the file") from None
    except (ValueError, RecursionError):        # an integer over 4,300 digits, or nesting past the stack
        raise UserError(f"{path} holds a number of more than 4300 digits or nesting too deep; fix the file") from None


_YARN_V3 = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

PRESETS: dict[str, dict[str, Any]] = {
    # The CPU default: a few million parameters, every V3 feature present (MLA with q LoRA, MoE with
    # groups, shared experts and a dense first layer, MTP).
    "tiny": dict(),
    # One GPU: the reference shape of docs/DESIGN.md §8 (896M total, 206M activated).
    "small": dict(
        vocab_size=32768, hidden_size=1024, num_hidden_layers=12, num_attention_heads=16,
        first_k_dense_replace=1, intermediate_size=2816, n_routed_experts=64, num_experts_per_tok=6,
        n_group=8, topk_group=4, n_shared_experts=2, moe_intermediate_size=352, q_lora_rank=384,
        kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
        max_position_embeddings=4096, num_nextn_predict_layers=1,
    ),
    # DeepSeek-V2-Lite (15.7B total, 2.4B activated): no q LoRA, softmax router, no MTP.
    "deepseek-v2-lite": dict(
        vocab_size=102400, hidden_size=2048, num_hidden_layers=27, num_attention_heads=16,
        intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64, n_shared_experts=2,
        num_experts_per_tok=6, n_group=1, topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        scoring_func="softmax", first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        num_nextn_predict_layers=0, model_type="deepseek_v2",
    ),
    # DeepSeek-V3 / R1 (671B total, 37B activated), as in the released config.json.
    "deepseek-v3": dict(
        vocab_size=129280, hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
        intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
        first_k_dense_replace=3, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=163840, rope_scaling=_YARN_V3,
        num_nextn_predict_layers=1,
    ),
}
