"""Single-device model code: the DeepSeek-V3 decoder and (in dense.py) Llama/Qwen2-style dense students.

Parallelism (FSDP, expert and pipeline parallel) is applied from outside, in nanoseek.parallel.
"""

from __future__ import annotations

from nanoseek.config import DenseConfig, ModelConfig
from nanoseek.model.deepseek import DeepseekV3ForCausalLM, ModelOutput
from nanoseek.model.block import DecoderLayer
from nanoseek.model.dense import DenseDecoderLayer, DenseForCausalLM
from nanoseek.model.cache import MLACache
from nanoseek.model.moe import expert_loads, max_violation, moe_layers, update_router_biases


def build_model(cfg: ModelConfig | DenseConfig):
    """ModelConfig -> DeepseekV3ForCausalLM; DenseConfig -> DenseForCausalLM. Honours `with torch.device(...)`."""
    if isinstance(cfg, DenseConfig):
        return DenseForCausalLM(cfg)
    return DeepseekV3ForCausalLM(cfg)


def set_activation_checkpointing(model, on: bool = True):
    """Checkpoint every decoder block of `model` (a dense model's layers; DeepSeek-V3's trunk layers and MTP
    blocks) in forwards that a backward can follow: `train.activation_checkpointing` (nanoseek.model.recompute).
    Returns the model."""
    for m in model.modules():
        if isinstance(m, (DecoderLayer, DenseDecoderLayer)):
            m.checkpoint = on
    return model


__all__ = ["build_model", "set_activation_checkpointing", "DeepseekV3ForCausalLM", "DenseForCausalLM", "ModelOutput", "MLACache", "moe_layers", "expert_loads",
           "update_router_biases", "max_violation"]
