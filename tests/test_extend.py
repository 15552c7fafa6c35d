"""Context extension: YaRN config, pass-key documents, the retrieval scorer, and `nanoseek extend` end to end."""

import json
import random
from types import SimpleNamespace

import pytest
import torch

from nanoseek.cli import main
from nanoseek.config import ModelConfig
from nanoseek.files import read_jsonl
from nanoseek.hf import load_pretrained, save_pretrained
from nanoseek.model import build_model
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.extend import PassKeyDocs, YarnConfig, retrieval_accuracy, yarn_config

BASE = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                   num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                   q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                   max_position_embeddings=64, num_nextn_predict_layers=1)
FILLER = [f"Question: What is {a} + {b}?\nAnswer: {a + b}" for a, b in
          ((random.Random(i).randint(0, 99), random.Random(-i).randint(0, 99)) for i in range(200))]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(FILLER + ["What is the pass key? The pass key is 12345. Remember it."] * 5, vocab_size=300)


def test_yarn_config_sets_scaling_and_length():
    cfg = yarn_config(BASE, YarnConfig(factor=4))
    assert cfg.max_position_embeddings == 256
    assert cfg.rope_scaling["type"] == "yarn" and cfg.rope_scaling["factor"] == 4
    assert cfg.rope_scaling["original_max_position_embeddings"] == 64
    # a second stage keeps the original length and compounds the factor (V3: 4K -> 32K -> 128K)
    again = yarn_config(cfg, YarnConfig(factor=2))
    assert again.rope_scaling["original_max_position_embeddings"] == 64 and again.rope_scaling["factor"] == 8
    assert again.max_position_embeddings == 512
    assert yarn_config(BASE, YarnConfig(factor=2, original_max_position_embeddings=32)).max_position_embeddings == 64


def test_pass_key_documents(tok):
    gen = PassKeyDocs(tok, FILLER, digits=5)
    rng = random.Random(0)
    for n_tokens in (64, 200, 500):
        for depth in (0.0, 0.5, 1.0):
            prompt, answer = gen.make(rng, n_tokens, depth)
            key = answer.strip()
            assert len(key) == 5 and key.isdigit() and prompt.count(key) == 2
            assert prompt.endswith("The pass key is")
            n = len(tok.encode(prompt + answer))
            assert n_tokens - 5 <= n <= n_tokens + 40, (n_tokens, n)     # filler comes in whole questions
            if n_tokens >= 200:                       # depth is measured in the filler (the haystack)
                at = len(tok.encode(prompt[:prompt.index(key)]))
                assert abs(at - depth * (n - gen.fixed_tokens)) < 0.1 * n, (n_tokens, depth, at)


class Oracle(torch.nn.Module):
    """Teacher-forced logits predicting the true next token, except where `corrupt(t, length)` says."""

    def __init__(self, vocab, pad_id, corrupt=lambda t, length: False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.pad_id, self.corrupt = vocab, pad_id, corrupt

    def forward(self, x):
        nxt = torch.roll(x, -1, dims=1)
        for r in range(x.shape[0]):
            length = int((x[r] != self.pad_id).sum())
            for t in range(x.shape[1]):
                if self.corrupt(t, length):
                    nxt[r, t] = (nxt[r, t] + 1) % self.vocab
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.vocab).float())


def test_retrieval_accuracy_scores_exactly_the_key_digits(tok):
    gen = PassKeyDocs(tok, FILLER, digits=4)
    rng = random.Random(1)
    docs = [gen.make(rng, 120, rng.random()) for _ in range(5)]
    V, pad = len(tok), tok.pad_id
    assert retrieval_accuracy(Oracle(V, pad), tok, docs, batch_size=2) == 1.0
    # wrong everywhere before the answer: still right (only the 4 key digits are scored)
    assert retrieval_accuracy(Oracle(V, pad, lambda t, n: t < n - 5), tok, docs, batch_size=2) == 1.0
    # the last key digit wrong, or the first: wrong
    assert retrieval_accuracy(Oracle(V, pad, lambda t, n: t == n - 2), tok, docs, batch_size=2) == 0.0
    assert retrieval_accuracy(Oracle(V, pad, lambda t, n: t == n - 5), tok, docs, batch_size=2) == 0.0


def test_extend_end_to_end(tmp_path, tok):
    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    save_pretrained(build_model(BASE), base_dir)
    tok.save(base_dir / "tokenizer")
    out = tmp_path / "ext"
    argv = ["extend", "--init", str(base_dir), "--out", str(out), "--no-progress",
            "--set", "train.steps=3", "--set", "train.seq_len=256", "--set", "train.batch_size=2",
            "--set", "retrieval.train_documents=12", "--set", "retrieval.val_documents=4",
            "--set", "retrieval.lengths=[64, 256]", "--set", "retrieval.depths=[0.5]", "--set", "retrieval.per_cell=2",
            "--set", "data.corpus.n_documents=300", "--set", "data.corpus.val_documents=10",
            "--set", "eval.val_batches=1", "--set", "checkpoint.every=0"]
    assert main(argv) == 0
    final = load_pretrained(out / "final")
    assert final.config.max_position_embeddings == 256
    scaling = final.config.rope_scaling
    assert scaling["type"] == "yarn" and scaling["factor"] == 4 and scaling["original_max_position_embeddings"] == 64
    rows = json.loads((out / "eval" / "retrieval.json").read_text())
    assert [(r["length"], r["depth"]) for r in rows] == [(64, 0.5), (256, 0.5)]
    assert all(0 <= r[k] <= 1 for r in rows for k in ("base", "base + YaRN", "extended"))
    assert "| 256 | 50% |" in (out / "eval" / "retrieval.md").read_text()
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    # the extended context is the limit now: asking for more is a one-line error, nothing written
    bad = tmp_path / "bad"
    assert main(argv[:3] + [str(bad)] + argv[4:] + ["--set", "train.seq_len=512"]) == 2
    assert not bad.exists()
