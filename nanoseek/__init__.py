"""nanoseek: the DeepSeek-V3 / DeepSeek-R1 training system, end to end, in compact PyTorch.

`load_pretrained(path)` loads a local Hugging Face directory (deepseek_v3 / qwen2 / qwen3 / llama) as a nanoseek model.
"""

from nanoseek.config import DenseConfig, ModelConfig
from nanoseek.errors import UserError
from nanoseek.hf import load_pretrained

__version__ = "0.1.0"


__all__ = ["ModelConfig", "DenseConfig", "UserError", "load_pretrained", "__version__"]
