"""Fixtures the test files share: a micro DeepSeek-V3 shape, a saved micro checkpoint with its tokenizer, and the
benchmark scripts loaded as modules."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from nanoseek.config import ModelConfig
from nanoseek.hf import save_pretrained
from nanoseek.model import build_model
from nanoseek.tasks import sample_problems
from nanoseek.tokenizer import Tokenizer, r1_zero_prompt

# The micro shape the CPU tests train and sample: 2 layers, hidden 32, MLA ranks 16, no MTP (a few seconds a run).
MICRO = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, kv_lora_rank=16, q_lora_rank=16,
             num_nextn_predict_layers=0)

# The same micro shape as a recipe's [model] section (the CLI tests append their max_position_embeddings).
MICRO_MODEL_TOML = """[model]
preset = "tiny"
vocab_size = 300
hidden_size = 32
intermediate_size = 64
moe_intermediate_size = 16
num_hidden_layers = 2
num_attention_heads = 2
n_routed_experts = 8
num_experts_per_tok = 2
n_group = 2
topk_group = 1
q_lora_rank = 16
kv_lora_rank = 16
qk_nope_head_dim = 8
qk_rope_head_dim = 4
v_head_dim = 8
"""


def make_base(root):
    """A micro DeepSeek model + a tokenizer trained on task solutions, saved as an HF directory `root/base`."""
    texts = [r1_zero_prompt(p.prompt) + p.completion()[len("<think>"):] for p in sample_problems("arithmetic", 50)]
    tok = Tokenizer.train(texts, 300)
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=len(tok), **MICRO))
    save_pretrained(model, root / "base")
    tok.save(root / "base" / "tokenizer")
    return root / "base"


@pytest.fixture(scope="session")
def base_checkpoint(tmp_path_factory):
    """One micro checkpoint (random weights, BPE tokenizer) for the tests that only read it."""
    return make_base(tmp_path_factory.mktemp("micro"))


@pytest.fixture
def load_benchmark(monkeypatch):
    """load_benchmark("fp8") -> benchmarks/fp8.py as a module (its directory on sys.path: the scripts import
    their sibling `common`)."""
    bench_dir = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(bench_dir))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"{name}_bench", bench_dir / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load
