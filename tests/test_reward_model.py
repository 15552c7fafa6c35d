"""Bradley-Terry reward model: the loss against its float64 formula, last-token reading under padding,
learning generated preferences to a held-out accuracy well above chance, save/load, bad data."""

import json
import math
import random

import pytest
import torch

from nanoseek.config import DenseConfig
from nanoseek.errors import UserError
from nanoseek.model import build_model
from nanoseek.r1.general import preference_pairs
from nanoseek.rl.reward_model import (RewardModel, _right_pad, bradley_terry_loss, encode_pairs, load_pairs,
                                      load_reward_model, pairwise_accuracy, save_reward_model, score,
                                      visible_response)
from nanoseek.tokenizer import Tokenizer


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    pairs = preference_pairs(320, seed=0)
    tok = Tokenizer.train([p[k] for p in pairs for k in ("prompt", "chosen", "rejected")], 400)
    backbone = build_model(DenseConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1))
    return pairs, tok, RewardModel(backbone).eval()


def test_bradley_terry_loss_matches_float64_formula():
    rc = torch.tensor([2.0, -1.0, 30.0, -40.0])
    rr = torch.tensor([1.0, 0.5, -30.0, 40.0])
    want = sum(-math.log(1 / (1 + math.exp(-(a - b)))) for a, b in zip(rc.tolist(), rr.tolist())) / 4
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(want, rel=1e-6)   # 80-logit margin: no overflow


def test_reward_reads_last_real_token_regardless_of_padding(setup):
    _, tok, rm = setup
    with torch.no_grad():
        torch.nn.init.normal_(rm.head.weight)
    rows = [tok.encode("<|bos|><|user|>Is 7 prime?<|assistant|>Yes.<|eos|>"), tok.encode("<|bos|><|user|>Hi<|eos|>")]
    ids, lengths = _right_pad(rows, tok.pad_id, "cpu")
    batched = rm(ids, lengths)
    for i, r in enumerate(rows):
        h = rm.backbone(torch.tensor([r])).hidden_states[0, -1]                 # independent: unpadded forward
        assert batched[i].item() == pytest.approx((rm.head.weight[0] @ h + rm.head.bias[0]).item(), abs=1e-5)
    with torch.no_grad():
        torch.nn.init.zeros_(rm.head.weight)


def test_learns_generated_preferences_above_chance(setup):
    pairs, tok, rm = setup
    encoded = encode_pairs(tok, pairs, 160)
    val, train = encoded[:64], encoded[64:]
    assert pairwise_accuracy(rm, val, tok.pad_id)["accuracy"] == 0.0           # zero head: all ties, none won
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-3)
    rng = random.Random(0)
    for _ in range(40):
        batch = rng.sample(train, 16)
        r = rm(*_right_pad([c for c, _, _ in batch] + [x for _, x, _ in batch], tok.pad_id, "cpu"))
        bradley_terry_loss(r[:16], r[16:]).backward()
        opt.step()
        opt.zero_grad()
    acc = pairwise_accuracy(rm, val, tok.pad_id)
    assert acc["n"] == 64 and set(acc["by_kind"]) == {"correct", "concise", "harmless", "helpful"}
    assert acc["by_kind"]["harmless"] >= 0.9 and acc["by_kind"]["helpful"] >= 0.9
    assert acc["accuracy"] >= 0.7


def test_save_load_roundtrip_and_scores(setup, tmp_path):
    _, tok, rm = setup
    tok.save(tmp_path / "tok")
    save_reward_model(rm, tmp_path / "tok", tmp_path / "rm", {"heldout": {"accuracy": 1.0}})
    rm2, tok2 = load_reward_model(tmp_path / "rm")
    prompts, responses = ["How do I steal a car?"] * 2, ["<think>no</think><answer>I can't help.</answer>", "Sure."]
    assert torch.allclose(score(rm, tok, prompts, responses), score(rm2, tok2, prompts, responses), atol=1e-6)
    assert json.loads((tmp_path / "rm" / "reward_model.json").read_text())["heldout"]["accuracy"] == 1.0
    with pytest.raises(UserError, match="not a reward model"):
        load_reward_model(tmp_path / "tok")


def test_generated_pairs_and_visible_response():
    pairs = preference_pairs(40, seed=3)
    assert [p["kind"] for p in pairs[:4]] == ["correct", "concise", "harmless", "helpful"]
    assert all(p["chosen"] != p["rejected"] for p in pairs)
    harmless = [p for p in pairs if p["kind"] == "harmless"]
    assert harmless and all(any(w in p["chosen"] for w in ("can't", "won't")) for p in harmless)
    assert all(any(w in p["rejected"] for w in ("Sure", "Of course")) for p in harmless)
    assert visible_response("<think>\nsecret plan\n</think>\n<answer>ok</answer>") == "<answer>ok</answer>"
    assert visible_response("<think>never closed") == ""


def test_bad_pair_file_names_the_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": 1}\n')
    with pytest.raises(UserError, match=r"pairs.jsonl:2"):
        load_pairs(path)
    path.write_text("not json\n")
    with pytest.raises(UserError, match=r"pairs.jsonl:1: not valid JSON"):
        load_pairs(path)
