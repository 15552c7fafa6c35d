"""nanoseek: the DeepSeek-V3 / DeepSeek-R1 training system, end to end, in compact PyTorch."""

from nanoseek.config import DenseConfig, ModelConfig
from nanoseek.errors import UserError
from nanoseek.hf import load_pretrained as _load

__version__ = "0.1.0"


def load_pretrained(path, **kwargs):
    """Load a local Hugging Face directory (deepseek_v3 / qwen2 / llama) as a nanoseek model."""
    return _load(path, **kwargs)


__all__ = ["ModelConfig", "DenseConfig", "UserError", "load_pretrained", "__version__"]
