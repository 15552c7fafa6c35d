"""Context extension: YaRN config, pass-key documents, the retrieval scorer, and `nanoseek extend` end to end."""

import json
import random
import re
from types import SimpleNamespace

import pytest
import torch

from nanoseek.cli import main
from nanoseek.config import ModelConfig
from nanoseek.files import read_jsonl
from nanoseek.hf import load_pretrained, save_pretrained
from nanoseek.model import build_model
from nanoseek.tokenizer import Tokenizer
from nanoseek.train.extend import BOXES, PassKeyDocs, YarnConfig, position_bands, retrieval_accuracy, yarn_config

BASE = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                   num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                   q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                   max_position_embeddings=64, num_nextn_predict_layers=1)
FILLER = [f"Question: What is {a} + {b}?\nAnswer: {a + b}" for a, b in
          ((random.Random(i).randint(0, 99), random.Random(-i).randint(0, 99)) for i in range(200))]


@pytest.fixture(scope="module")
def tok():
    boxes = [f"What is the pass key of box {b}? The pass key of box {b} is 12345." for b in BOXES]
    return Tokenizer.train(FILLER + boxes * 5, vocab_size=300)


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
    gen = PassKeyDocs(tok, FILLER, digits=5, needles=3)
    rng = random.Random(0)
    for n_tokens in (120, 200, 500):
        for depth in (0.0, 0.5, 1.0):
            ids, spans = gen.document(rng, n_tokens, depth)
            assert len(ids) == n_tokens and ids[0] == tok.bos_id and len(spans) == 1   # exact length, one question
            text = tok.decode(ids)
            (start, end), = spans
            key = tok.decode(ids[start:end]).strip()
            assert len(key) == 5 and key.isdigit() and text.count(key) == 2
            box = re.findall(r"pass key of box (\w+) is$", tok.decode(ids[:start]))[0]
            assert f"The pass key of box {box} is {key}." in text
            assert len(set(re.findall(r"The pass key of box (\w+) is", text))) == 3          # 3 needles
            if n_tokens >= 200:           # the asked needle sits at `depth` of the haystack
                at = len(tok.encode(text[:text.index(f"box {box} is {key}")]))
                haystack = n_tokens - len(tok.encode(text[text.index("\nWhat is"):])) - 3 * 12
                assert abs(at - depth * haystack) < 0.15 * n_tokens, (n_tokens, depth, at)
    # training documents: exactly n_tokens, bos ... eos, every needle asked and answered
    for ids in gen.train_ids(rng, 4, 300):
        text = tok.decode(ids)
        assert len(ids) == 300 and ids[-1] == tok.eos_id and text.count("What is the pass key") == 3
        for box, key in re.findall(r"The pass key of box (\w+) is (\d+)\.", text.split("\nWhat is")[0]):
            assert f"The pass key of box {box} is {key}.\nWhat" in text or text.endswith(f"box {box} is {key}.<|eos|>")


class Oracle(torch.nn.Module):
    """Teacher-forced logits predicting the true next token, except at positions `corrupt(t)` says."""

    def __init__(self, vocab, corrupt=lambda t: False):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.corrupt = vocab, corrupt

    def forward(self, x):
        nxt = torch.roll(x, -1, dims=1)
        for t in range(x.shape[1]):
            if self.corrupt(t):
                nxt[:, t] = (nxt[:, t] + 1) % self.vocab
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, self.vocab).float())


def test_retrieval_accuracy_scores_exactly_the_key_digits(tok):
    gen = PassKeyDocs(tok, FILLER, digits=4, needles=2)
    rng = random.Random(1)
    docs = [gen.document(rng, 120, rng.random()) for _ in range(5)]
    V, pad = len(tok), tok.pad_id
    assert retrieval_accuracy(Oracle(V), docs, pad, batch_size=2) == 1.0
    for doc in docs:                     # every document: 120 ids ending in the key and "."
        (start, end), = doc[1]
        assert end == 119 and tok.decode(doc[0][start:end]).strip().isdigit()
        # wrong everywhere before the key (logit t predicts id t + 1): still right, only the key is scored
        assert retrieval_accuracy(Oracle(V, lambda t: t < start - 1 or t >= end - 1), [doc], pad) == 1.0
        # the last key digit wrong, or the first: wrong
        assert retrieval_accuracy(Oracle(V, lambda t: t == end - 2), [doc], pad) == 0.0
        assert retrieval_accuracy(Oracle(V, lambda t: t == start - 1), [doc], pad) == 0.0
    # a training document asks for both keys: each is scored
    ids, spans = gen.document(rng, 150, 0.3, queries=2)
    first = spans[0][0]
    assert retrieval_accuracy(Oracle(V, lambda t: t == first - 1), [(ids, spans)], pad) == 0.5


def test_position_bands_match_a_direct_sum(tok):
    """Per-band loss and accuracy against each document's unpadded forward, summed by hand in float64."""
    torch.manual_seed(0)
    model = build_model(BASE.replace(vocab_size=len(tok), max_position_embeddings=256)).eval()
    rng = random.Random(2)
    docs = [[rng.randrange(len(tok)) for _ in range(n)] for n in (40, 100, 7, 100)]
    docs[1][50:60] = [docs[1][49]] * 10          # some predictable tokens, so that accuracy is not all zero
    edges = [16, 64, 99]
    got = position_bands(model, docs, edges, tok.pad_id, batch_size=3)
    loss, right, count = [0.0] * 3, [0] * 3, [0] * 3
    for ids in docs:
        ids = ids[:edges[-1] + 1]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), -1)
        for t in range(len(ids) - 1):
            band = 0 if t < 16 else 1 if t < 64 else 2
            loss[band] -= float(logp[t, ids[t + 1]])
            right[band] += int(logp[t].argmax()) == ids[t + 1]
            count[band] += 1
    assert got["loss"] == pytest.approx([s / c for s, c in zip(loss, count)], rel=1e-5)
    assert got["accuracy"] == pytest.approx([r / c for r, c in zip(right, count)])


def test_extend_end_to_end(tmp_path, tok):
    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    save_pretrained(build_model(BASE), base_dir)
    tok.save(base_dir / "tokenizer")
    out = tmp_path / "ext"
    argv = ["extend", "--init", str(base_dir), "--out", str(out), "--no-progress",
            "--set", "train.steps=3", "--set", "train.seq_len=256", "--set", "train.batch_size=2",
            "--set", "retrieval.train_documents=12", "--set", "retrieval.val_documents=4", "--set", "retrieval.needles=1",
            "--set", "retrieval.lengths=[64, 256]", "--set", "retrieval.depths=[0.5]", "--set", "retrieval.per_cell=2",
            "--set", "data.corpus.n_documents=300", "--set", "data.corpus.val_documents=10",
            "--set", "eval.val_batches=1", "--set", "checkpoint.every=0"]
    assert main(argv) == 0
    final = load_pretrained(out / "final")
    assert final.config.max_position_embeddings == 256
    scaling = final.config.rope_scaling
    assert scaling["type"] == "yarn" and scaling["factor"] == 4 and scaling["original_max_position_embeddings"] == 64
    result = json.loads((out / "eval" / "long_context.json").read_text())
    rows = result["retrieval"]
    assert [(r["length"], r["depth"]) for r in rows] == [(64, 0.5), (256, 0.5)]
    assert all(0 <= r[k] <= 1 for r in rows for k in ("base", "base + YaRN", "extended"))
    bands = result["bands"]
    assert bands["positions"] == [[0, 64], [64, 256]]
    for k in ("base", "base + YaRN", "extended"):
        assert len(bands[k]["loss"]) == 2 and min(bands[k]["loss"]) > 0 and all(0 <= a <= 1 for a in bands[k]["accuracy"])
    table = (out / "eval" / "long_context.md").read_text()
    assert "| 256 | 50% |" in table and "| 64-255 |" in table
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2, 3]
    # the extended context is the limit now: asking for more is a one-line error, nothing written
    bad = tmp_path / "bad"
    assert main(argv[:3] + [str(bad)] + argv[4:] + ["--set", "train.seq_len=512"]) == 2
    assert not bad.exists()
