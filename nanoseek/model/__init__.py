"""Single-device model code: the DeepSeek-V3 decoder and (in dense.py) Llama/Qwen2-style dense students.

Parallelism (FSDP, expert and pipeline parallel) is applied from outside, in nanoseek.parallel.
"""

from __future__ import annotations

from nanoseek.config import DenseConfig, ModelConfig
from nanoseek.model.deepseek import DeepseekV3ForCausalLM, ModelOutput
from nanoseek.model.dense import DenseForCausalLM
from nanoseek.model.mla import MLACache
from nanoseek.model.moe import expert_loads, max_violation, moe_layers, update_router_biases


def build_model(cfg: ModelConfig | DenseConfig):
    """ModelConfig -> DeepseekV3ForCausalLM; DenseConfig -> DenseForCausalLM. Honours `with torch.device(...)`."""
    if isinstance(cfg, DenseConfig):
        return DenseForCausalLM(cfg)
    return DeepseekV3ForCausalLM(cfg)


__all__ = ["build_model", "DeepseekV3ForCausalLM", "DenseForCausalLM", "ModelOutput", "MLACache", "moe_layers", "expert_loads",
           "update_router_biases", "max_violation"]
