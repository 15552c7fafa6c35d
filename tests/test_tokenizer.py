"""Tokenizer: byte-level BPE training, HF file round trip (checked against transformers), chat templates,
loading tokenizers we did not train, and bad-input errors."""

import json
import random
import re

import pytest

from nanoseek.errors import UserError
from nanoseek.tokenizer import (ANSWER, BOS, CHAT_TEMPLATE, END_ANSWER, END_THINK, EOS, MIN_VOCAB, PAD,
                                SPECIAL_TOKENS, THINK, Tokenizer, check_vocab_fits, r1_zero_prompt, render_chat)

WORDS = "the sum of and minus times equals so we carry answer check first then add subtract number".split()


def _texts(n=600, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 9999), rng.randint(0, 999)
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        out.append(f"{THINK}{words} {a} + {b} = {a + b}{END_THINK}{ANSWER}{a + b}{END_ANSWER}")
    return out


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(_texts(), vocab_size=400)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    tok.save(path)
    return path


CHATS = [
    [{"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 7 and 8."},
     {"role": "assistant", "content": "<think>7 + 8 = 15</think><answer>15</answer>"},
     {"role": "user", "content": "And 15 × 2? café ✓"}],
]


def test_roundtrip_and_digits(tok):
    samples = _texts(50, seed=1) + ["Ünïcödé ✓ 東京 🙂\n\ttabs", "", "  spaces  ", "<|user|>hi<|assistant|>"]
    for text in samples:
        assert tok.decode(tok.encode(text)) == text
    # digits one per token: no token of a long number covers two digits
    ids = tok.encode("x 1234567890 and 98765")
    pieces = [tok.decode([i]) for i in ids]
    assert all(len(re.findall(r"\d", p)) <= 1 for p in pieces)
    assert "".join(pieces) == "x 1234567890 and 98765"


def test_special_tokens(tok):
    assert [tok.token_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (tok.token_id(BOS), tok.token_id(EOS), tok.token_id(PAD))
    assert len(tok) == tok.vocab_size <= 400
    ids = tok.encode(f"{BOS}<|user|>q{THINK}r{END_THINK}{EOS}")
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.token_id(THINK) in ids
    # the reasoning tags survive skip_special_tokens (rewards parse them); bos/eos/roles do not
    assert tok.decode(ids, skip_special_tokens=True) == f"q{THINK}r{END_THINK}"
    # BPE spent no merges on the special strings
    vocab = tok.backend.get_vocab()
    assert not [t for t in vocab if re.search(r"think|<\||\|>|</", t) and t not in SPECIAL_TOKENS]
    assert tok.token_id("not-a-token") is None


def test_train_rejects_tiny_vocab():
    with pytest.raises(UserError, match="too small"):
        Tokenizer.train(["abc"], vocab_size=MIN_VOCAB - 1)


def test_save_load_and_transformers_agree(tok, saved):
    transformers = pytest.importorskip("transformers")
    loaded = Tokenizer.load(saved)
    hf = transformers.AutoTokenizer.from_pretrained(str(saved))
    texts = _texts(20, seed=2) + ["Ünïcödé ✓ 東京", "<|bos|>a<|eos|>"]
    for text in texts:
        assert loaded.encode(text) == tok.encode(text) == hf.encode(text, add_special_tokens=False)
        ids = tok.encode(text)
        assert loaded.decode(ids) == hf.decode(ids) == text
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_id, tok.eos_id, tok.pad_id)
    assert len(hf) == len(loaded) == len(tok)
    for messages in CHATS:
        for gen in (True, False):
            ours = loaded.encode(loaded.apply_chat_template(messages, add_generation_prompt=gen))
            theirs = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
            theirs = theirs["input_ids"] if isinstance(theirs, dict) or hasattr(theirs, "keys") else theirs
            assert ours == list(theirs)
            assert loaded.apply_chat_template(messages, gen) == hf.apply_chat_template(
                messages, add_generation_prompt=gen, tokenize=False)


def test_chat_format(tok):
    text = tok.apply_chat_template(CHATS[1], add_generation_prompt=True)
    assert text == ("<|bos|><|system|>Be brief.<|user|>Add 7 and 8.<|assistant|><think>7 + 8 = 15</think>"
                    "<answer>15</answer><|eos|><|user|>And 15 × 2? café ✓<|assistant|>")
    assert render_chat(CHATS[1]) == text  # the corpus renders without a tokenizer
    prompt = r1_zero_prompt("What is 2 + 3?")
    assert prompt.endswith("User: What is 2 + 3? Assistant: <think>")
    assert all(t in prompt for t in (THINK, END_THINK, ANSWER, END_ANSWER))


def _qwen_like(tmp_path, with_config=True):
    """A BPE tokenizer built another way: other special names, a ChatML template, no bos."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, trainers
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend.train_from_iterator(_texts(200), trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    backend.save(str(tmp_path / "tokenizer.json"))
    template = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    if with_config:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>", "chat_template": template, "model_max_length": 4096}))
    return tmp_path


def test_load_foreign_bpe_with_chatml(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = _qwen_like(tmp_path)
    tok = Tokenizer.load(path)
    hf = transformers.AutoTokenizer.from_pretrained(str(path))
    assert tok.bos_id is None
    assert (tok.eos_id, tok.pad_id) == (hf.eos_token_id, hf.pad_token_id) == (2, 0)
    for messages in CHATS:
        text = tok.apply_chat_template(messages)
        assert text == hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    # save keeps the foreign settings
    tok.save(tmp_path / "copy")
    again = Tokenizer.load(tmp_path / "copy")
    assert again.chat_template == tok.chat_template and again.eos_token == "<|im_end|>" and again.bos_id is None
    assert json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text())["model_max_length"] == 4096


def test_load_without_config_guesses_specials(tmp_path):
    tok = Tokenizer.load(_qwen_like(tmp_path, with_config=False) / "tokenizer.json")
    assert tok.eos_token == "<|endoftext|>" and tok.bos_id is None and tok.pad_id == tok.eos_id
    assert tok.chat_template == CHAT_TEMPLATE  # role tokens are then plain text
    assert tok.decode(tok.encode(tok.apply_chat_template(CHATS[0]))) == "<|user|>What is 12 + 30?<|assistant|>"


def test_load_wordlevel(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as Backend, models, pre_tokenizers
    words = ["[UNK]", "[BOS]", "[EOS]", "[PAD]"] + sorted(set(WORDS)) + [str(d) for d in range(10)] + ["+", "="]
    backend = Backend(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["[UNK]", "[BOS]", "[EOS]", "[PAD]"])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "[EOS]",
        "bos_token": {"__type": "AddedToken", "content": "[BOS]", "special": True},   # the older dict form
        "pad_token": "[PAD]", "unk_token": "[UNK]"}))
    tok = Tokenizer.load(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 3)
    text = "the sum of 3 and 4 equals 7 zebra"
    assert tok.encode(text) == hf.encode(text, add_special_tokens=False)
    assert tok.encode("zebra") == [0] and len(tok) == len(words)


def test_load_errors(tmp_path, saved):
    with pytest.raises(UserError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "bad")
    cfg = json.loads((saved / "tokenizer_config.json").read_text())
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "tokenizer.json").write_text((saved / "tokenizer.json").read_text())
    (tmp_path / "cfg" / "tokenizer_config.json").write_text(json.dumps({**cfg, "eos_token": "<|nope|>"}))
    with pytest.raises(UserError, match="eos_token '<\\|nope\\|>' is not in the vocabulary"):
        Tokenizer.load(tmp_path / "cfg")
    (tmp_path / "cfg" / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "{% for %}"}))
    with pytest.raises(UserError, match="chat template"):
        Tokenizer.load(tmp_path / "cfg").apply_chat_template(CHATS[0])


def test_check_vocab_fits():
    check_vocab_fits(1024, 1024)
    with pytest.raises(UserError, match="vocab_size >= 1025"):
        check_vocab_fits(1025, 1024)
