"""Data: token shards, packing, resumable iterators, SFT masking, bad data, and the corpus."""

import json
import random
import re
from collections import Counter

import numpy as np
import pytest
import torch

from nanoseek.config import ModelConfig
from nanoseek.data import PackedDataset, SFTDataset, load_chat_records, load_index, write_shards
from nanoseek.errors import UserError
from nanoseek.tokenizer import Tokenizer


def _docs(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        out.append(f"doc {i}: {a} + {b} = <think>add</think><answer>{a + b}</answer>" + " pad" * rng.randint(0, 20))
    return out


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(_docs(300), vocab_size=320)


@pytest.fixture(scope="module")
def shards(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("shards") / "train"
    write_shards(_docs(200, seed=1), tok, path, shard_tokens=1500, progress=False)
    return path


def _stream(tok, texts):
    """Reference token stream, built independently of write_shards."""
    return [t for text in texts for t in [tok.bos_id] + tok.encode(text) + [tok.eos_id]]


def test_shards_hold_the_documents(tok, shards):
    index = load_index(shards)
    assert index["dtype"] == "uint16" and index["n_documents"] == 200 and len(index["shards"]) > 2
    stored = np.concatenate([np.fromfile(shards / s["file"], dtype=np.uint16) for s in index["shards"]])
    assert stored.tolist() == _stream(tok, _docs(200, seed=1))
    assert sum(s["n_documents"] for s in index["shards"]) == 200
    for s in index["shards"]:  # shards split at document boundaries
        arr = np.fromfile(shards / s["file"], dtype=np.uint16)
        assert arr[0] == tok.bos_id and arr[-1] == tok.eos_id


def _reference_layout(docs, shard_tokens):
    """The shard layout by its definition: a shard closes at the first document end at or past shard_tokens."""
    shards, group = [], []
    for ids in docs:
        group.append(ids)
        if sum(map(len, group)) >= shard_tokens:
            shards.append(group)
            group = []
    return shards + ([group] if group else [])


@pytest.mark.parametrize("shard_tokens", [1, 7, 50, 333, 10**6])
def test_shard_layout_matches_its_definition(tmp_path, tok, shard_tokens):
    rng = random.Random(shard_tokens)
    bos, eos = tok.bos_id, tok.eos_id
    docs = [[rng.randrange(10, 300) for _ in range(rng.randint(0, 40))] for _ in range(1100)]   # 2 encode batches
    index = write_shards(docs, tok, tmp_path / "s", shard_tokens=shard_tokens, progress=False)
    expected = _reference_layout([[bos] + d + [eos] for d in docs], shard_tokens)
    assert [(s["n_documents"], s["n_tokens"]) for s in index["shards"]] == \
        [(len(g), sum(map(len, g))) for g in expected]
    for s, group in zip(index["shards"], expected):
        assert np.fromfile(tmp_path / "s" / s["file"], dtype=np.uint16).tolist() == [t for d in group for t in d]
    assert index["n_documents"] == 1100 and index["n_tokens"] == sum(len(d) + 2 for d in docs)


def _profile_events(fn) -> int:
    """Python and C calls made while fn() runs: a machine-independent count of work (no clock, no flakiness)."""
    import sys
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        count += 1
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return count


def test_shard_writing_is_linear_in_the_documents(tmp_path, tok):
    """Writing 4x the documents costs about 4x the calls. The old writer re-summed the open shard's documents on
    every append (10K / 20K / 40K documents took 1.7 / 6.9 / 51 s): ~16x here, one shard holding them all."""
    def calls(n):
        docs = [[11, 12, 13]] * n
        return _profile_events(lambda: write_shards(docs, tok, tmp_path / str(n), shard_tokens=10**9, progress=False))
    small, large = calls(1500), calls(6000)
    assert large < 6 * small, (small, large)


def test_packed_rows_cover_each_target_once_per_epoch(tok, shards):
    T = 16
    reference = []  # rows of T+1 tokens, stride T, within each shard
    for s in load_index(shards)["shards"]:
        arr = np.fromfile(shards / s["file"], dtype=np.uint16).tolist()
        reference += [tuple(arr[r * T:r * T + T + 1]) for r in range((len(arr) - 1) // T)]
    ds = PackedDataset(shards, T, 1, seed=3)
    seen = []
    for _ in range(len(reference)):      # one epoch
        x, y = ds.next_batch()
        assert x.shape == y.shape == (1, T) and x.dtype == y.dtype == torch.long
        assert torch.equal(x[:, 1:], y[:, :-1])          # labels aligned: labels[t] = token t+1
        seen.append(tuple(x[0].tolist() + y[0, -1:].tolist()))
    assert sorted(seen) == sorted(reference) and seen != reference
    x, _ = PackedDataset(shards, T, 4, seed=3).next_batch()    # batches are consecutive rows of the order
    assert [tuple(r) for r in x.tolist()] == [r[:-1] for r in seen[:4]]


def test_epoch_is_a_permutation_and_seed_matters(shards):
    ds = PackedDataset(shards, 16, 1, seed=0)
    first = [ds.cursor.take(1)[0] for _ in range(ds.n_rows)]
    assert sorted(first) == list(range(ds.n_rows)) and first != sorted(first)
    second = [ds.cursor.take(1)[0] for _ in range(ds.n_rows)]
    assert sorted(second) == list(range(ds.n_rows)) and second != first   # a new order each epoch
    a, b = PackedDataset(shards, 16, 4, seed=0), PackedDataset(shards, 16, 4, seed=1)
    assert not torch.equal(a.next_batch()[0], b.next_batch()[0])
    plain = PackedDataset(shards, 16, 4, shuffle=False)
    assert torch.equal(plain.next_batch()[0][0], torch.from_numpy(plain.row(0)[:-1].astype(np.int64)))


def _sft_records(n, seed=0):
    rng = random.Random(seed)
    return [{"prompt": f"add {a} and {b}" + " please" * rng.randint(0, 5),
             "response": f"<think>{a} + {b}</think><answer>{a + b}</answer>"}
            for a, b in ((rng.randint(0, 99), rng.randint(0, 99)) for _ in range(n))]


def _make(kind, tok, shards):
    if kind == "packed":
        return PackedDataset(shards, 16, 3, seed=5)
    return SFTDataset(_sft_records(17), tok, 64, 3, seed=5)


@pytest.mark.parametrize("kind", ["packed", "sft"])
def test_resume_replays_the_same_batches(kind, tok, shards):
    ds = _make(kind, tok, shards)
    n = ds.cursor.n
    for _ in range(n // 3 + 1):          # stop just past an epoch boundary
        ds.next_batch()
    state = json.loads(json.dumps(ds.state_dict()))  # plain ints: JSON- and torch.load(weights_only)-safe
    expected = [ds.next_batch() for _ in range(n // 3 + 2)]   # crosses the next epoch boundary too
    fresh = _make(kind, tok, shards)
    fresh.load_state_dict(state)
    it = iter(fresh)
    for x, y in expected:
        fx, fy = next(it)
        assert torch.equal(fx, x) and torch.equal(fy, y)
    other = SFTDataset(_sft_records(17), tok, 64, 3, seed=6) if kind == "sft" else PackedDataset(shards, 16, 3, seed=6)
    with pytest.raises(UserError, match="seed"):
        other.load_state_dict(state)


@pytest.mark.parametrize("kind", ["packed", "sft"])
def test_ranks_split_the_global_batch(kind, tok, shards):
    if kind == "packed":
        make = lambda **kw: PackedDataset(shards, 16, kw.pop("b"), seed=2, **kw)  # noqa: E731
    else:
        make = lambda **kw: SFTDataset(_sft_records(17), tok, 64, kw.pop("b"), seed=2, **kw)  # noqa: E731
    whole = make(b=4)
    parts = [make(b=2, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        x, y = whole.next_batch()
        pieces = [p.next_batch() for p in parts]
        width = x.shape[1]
        pad = lambda t, v: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=v)  # noqa: E731
        assert torch.equal(torch.cat([pad(px, tok.pad_id) for px, _ in pieces]), x)
        assert torch.equal(torch.cat([pad(py, -100) for _, py in pieces]), y)


def test_sft_loss_only_on_responses(tok):
    records = _sft_records(6) + [{"messages": [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "1 + 1?"},
        {"role": "assistant", "content": "<answer>2</answer>"}, {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "<answer>4</answer>"}]}]
    ds = SFTDataset(records, tok, 64, 7, shuffle=False)
    x, y = ds.next_batch()
    for row, record in enumerate(records):
        responses = [m["content"] for m in record.get("messages", [])
                     if m["role"] == "assistant"] or [record["response"]]
        trained = [t for t in y[row].tolist() if t != -100]
        assert tok.decode(trained) == "".join(r + "<|eos|>" for r in responses)
        full = tok.encode(tok.apply_chat_template(record.get("messages") or [
            {"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}],
            add_generation_prompt=False))
        n = len(full) - 1
        assert x[row, :n].tolist() == full[:-1] and (x[row, n:] == tok.pad_id).all() and (y[row, n:] == -100).all()
        mask = y[row, :n] != -100
        assert torch.equal(y[row, :n][mask], torch.tensor(full[1:])[mask])  # aligned targets


def test_sft_takes_normalised_message_lists(tok):
    """What load_chat_records / to_messages return (message lists) feeds SFTDataset as it is."""
    from nanoseek.data.sft import to_messages

    records = _sft_records(3)
    a, b = SFTDataset(records, tok, 64, 3, shuffle=False), SFTDataset([to_messages(r) for r in records], tok, 64, 3,
                                                                     shuffle=False)
    assert all(torch.equal(u, v) for u, v in zip(a.next_batch(), b.next_batch()))
    with pytest.raises(UserError, match="role"):
        SFTDataset([[{"role": "user"}]], tok, 64, 1)


def test_sft_with_foreign_template(tmp_path, tok):
    """A ChatML template: the turn's closing tokens are trained too; BPE merges across the seam are fine."""
    cfg = {"bos_token": None, "eos_token": "<|eos|>", "pad_token": "<|pad|>",
           "chat_template": "{% for m in messages %}{{ '<|user|>' if m['role'] == 'user' else '<|assistant|>' }}"
                            "{{ m['content'] + ' done\\n' }}{% endfor %}"
                            "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"}
    tok.save(tmp_path / "t")
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps(cfg))
    foreign = Tokenizer.load(tmp_path / "t")
    ds = SFTDataset(_sft_records(2), foreign, 64, 2, shuffle=False)
    _, y = ds.next_batch()
    for row, rec in enumerate(_sft_records(2)):
        assert foreign.decode([t for t in y[row].tolist() if t != -100]) == rec["response"] + " done\n"


def test_bad_sft_data(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="empty"):
        load_chat_records(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_sft_records(1)[0]) + "\n{oops\n")
    with pytest.raises(UserError, match=f"{bad}:2: not valid JSON"):
        load_chat_records(bad)
    bad.write_text(json.dumps({"question": "x"}) + "\n")
    with pytest.raises(UserError, match=f"{bad}:1: expected"):
        load_chat_records(bad)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(UserError, match="no assistant message"):
        load_chat_records(bad)
    with pytest.raises(UserError, match="not found"):
        load_chat_records(tmp_path / "missing.jsonl")
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in _sft_records(4)))
    assert len(SFTDataset(good, tok, 64, 2).examples) == 4
    with pytest.raises(UserError, match="longer than seq_len"):
        SFTDataset(good, tok, 8, 2)


def test_model_fit_errors(tok, shards):
    small_vocab = ModelConfig(vocab_size=tok.vocab_size - 1)
    with pytest.raises(UserError, match=f"vocab_size >= {tok.vocab_size}"):
        PackedDataset(shards, 16, 2, model_config=small_vocab)
    with pytest.raises(UserError, match=f"vocab_size >= {tok.vocab_size}"):
        SFTDataset(_sft_records(4), tok, 64, 2, model_config=small_vocab)
    short = ModelConfig(vocab_size=1024, max_position_embeddings=32)
    with pytest.raises(UserError, match="max_position_embeddings 32"):
        PackedDataset(shards, 64, 2, model_config=short)
    PackedDataset(shards, 32, 2, model_config=short)
    with pytest.raises(UserError, match="fewer than one batch"):
        PackedDataset(shards, 16, 10_000)


def test_bad_shards_and_atomic_write(tmp_path, tok, shards):
    with pytest.raises(UserError, match="index.json missing"):
        PackedDataset(tmp_path / "nothing", 16, 2)
    with pytest.raises(UserError, match="corpus is empty"):
        write_shards([], tok, tmp_path / "empty")
    assert not (tmp_path / "empty").exists()

    class Failing:  # dies on the second chunk, after a shard was written
        def __init__(self):
            self.calls = 0

        def __getattr__(self, name):
            return getattr(tok, name)

        def encode_batch(self, texts):
            self.calls += 1
            if self.calls == 2:
                raise RuntimeError("killed")
            return tok.encode_batch(texts)

    out = tmp_path / "out"
    write_shards(_docs(10), tok, out, progress=False)
    before = (out / "index.json").read_text()
    with pytest.raises(RuntimeError):
        write_shards(_docs(3000), Failing(), out, shard_tokens=100, progress=False)
    assert (out / "index.json").read_text() == before          # the old shards are untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left behind
    (out / "shard_00000.bin").write_bytes(b"\0\0")
    with pytest.raises(UserError, match="truncated"):
        load_index(out)


# ---- corpus
from nanoseek.data import CorpusConfig, build_corpus, general_examples, prepare_corpus  # noqa: E402
from nanoseek.data.corpus import number_words  # noqa: E402
from nanoseek.tasks import get_family  # noqa: E402
from nanoseek.tasks.language import language_share, render  # noqa: E402


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(CorpusConfig(n_documents=1500, seed=7))


def test_corpus_is_deterministic_and_seeded(corpus):
    again = build_corpus(CorpusConfig(n_documents=1500, seed=7))
    assert [d.text for d in again] == [d.text for d in corpus]
    other = build_corpus(CorpusConfig(n_documents=1500, seed=8))
    val = build_corpus(CorpusConfig(n_documents=1500, val_documents=200, seed=7), "val")
    assert len(val) == 200
    texts = [d.text for d in corpus]
    assert sum(a == b for a, b in zip(texts, (d.text for d in other))) < 0.05 * len(texts)
    assert len(set(texts) & {d.text for d in val}) < 0.1 * len(val)   # val: fresh draws (tiny problems repeat)


def test_corpus_only_train_problems(corpus):
    task = [d for d in corpus if d.kind != "general"]
    assert {d.family for d in task} == {"arithmetic", "countdown", "linear"}
    for d in task:
        assert d.problem.split == "train"
        assert d.problem.prompt in d.text or render(d.problem.prompt, "alt") in d.text


def test_corpus_quality_checked_by_the_verifiers(corpus):
    task = [d for d in corpus if d.kind != "general"]
    wrong = [d for d in task if not d.correct]
    assert abs(len(wrong) / len(task) - CorpusConfig().wrong) < 0.05
    for d in task:   # the family's own verifier reads the document's final answer
        assert get_family(d.family).score(d.problem, d.text, fallback=True) == float(d.correct), d.text
        if d.kind in ("r1zero", "think"):    # tagged surfaces score under the strict <answer> rule too
            assert get_family(d.family).score(d.problem, d.text) == float(d.correct), d.text
    kinds = {k: sum(d.kind == k for d in corpus) / len(corpus) for k in ("r1zero", "think", "plain", "bare", "general")}
    weights = {k: getattr(CorpusConfig(), k) for k in kinds}
    assert all(abs(kinds[k] - w / sum(weights.values())) < 0.04 for k, w in weights.items()), kinds
    lengths = [len(d.text) for d in task if d.kind in ("think", "plain")]
    assert max(lengths) > 3 * min(lengths)          # mixed lengths
    r1 = [d.text for d in task if d.kind == "r1zero"]
    assert all("User: " in t and "Assistant: <think>" in t and t.rstrip().endswith("</answer>") for t in r1)


def test_corpus_language_registers(corpus):
    by = {lang: [d for d in corpus if d.language == lang] for lang in ("en", "alt", "mixed")}
    assert all(by.values())
    body = lambda d: d.text.split("User: ")[-1]   # noqa: E731 (past the English R1-Zero instructions)
    assert all(language_share(body(d), "alt") == 0 for d in by["en"])
    assert all(render(body(d), "alt") == body(d) and language_share(body(d), "alt") >= 0.5 for d in by["alt"])
    both = [d for d in by["mixed"] if 0 < language_share(body(d), "alt") < 1]
    assert len(both) > 0.4 * len(by["mixed"])       # switching registers inside one trace


def _is_prime(n):
    return n > 1 and all(n % k for k in range(2, n))


def test_general_examples():
    assert [number_words(n) for n in (0, 13, 40, 95, 402, 1000, 21_305)] == [
        "zero", "thirteen", "forty", "ninety-five", "four hundred and two", "one thousand",
        "twenty-one thousand three hundred and five"]
    examples = general_examples(300, seed=1)
    assert examples == general_examples(300, seed=1) and len({e["prompt"] for e in examples}) > 200
    checked = 0
    for e in examples:
        if m := re.fullmatch(r"Is (\d+) prime\?", e["prompt"]):
            n = int(m.group(1))
            assert e["response"].startswith("Yes" if _is_prime(n) else "No")
            checked += 1
        elif m := re.fullmatch(r"Spell the word (\w+) backwards\.", e["prompt"]):
            assert e["response"] == m.group(1)[::-1] + "."
            checked += 1
    assert checked > 50


def test_prepare_corpus_reuses_and_rebuilds(tmp_path, tok, monkeypatch):
    import nanoseek.data.corpus as corpus_mod
    cfg = CorpusConfig(n_documents=200, val_documents=20, seed=1)
    train_dir, val_dir = prepare_corpus(tmp_path / "data", cfg, tok, progress=False)
    train, val = load_index(train_dir), load_index(val_dir)
    assert (train["n_documents"], val["n_documents"]) == (200, 20)
    assert train["meta"]["corpus"]["seed"] == 1 and sum(train["meta"]["kinds"].values()) == 200
    stream = np.fromfile(train_dir / "shard_00000.bin", dtype=np.uint16).tolist()
    assert stream == _stream(tok, [d.text for d in build_corpus(cfg)])
    calls = []
    monkeypatch.setattr(corpus_mod, "write_shards", lambda *a, **k: calls.append(a))
    prepare_corpus(tmp_path / "data", cfg, tok, progress=False)
    assert calls == []                                 # same config and tokenizer: reused
    prepare_corpus(tmp_path / "data", CorpusConfig(n_documents=100, val_documents=20, seed=1), tok, progress=False)
    assert len(calls) == 2                             # config changed: both rebuilt
    with pytest.raises(UserError, match="wrong"):
        CorpusConfig(wrong=1.5)


def test_corpus_stream_unchanged():
    """A corpus of at most CHUNK_DOCUMENTS documents is drawn as before parallel generation existed: the tiny
    recipe's tokens, and every number measured on them, stay as they were (hashes of the pre-chunking code)."""
    import hashlib
    digest = lambda docs: hashlib.sha256("\0".join(d.text for d in docs).encode()).hexdigest()   # noqa: E731
    assert digest(build_corpus(CorpusConfig(n_documents=300, seed=0))) == \
        "29a3f0def6e111208dec24ee328c287038bb320cdf7f20dc6a7f31a319a8a8ff"
    assert digest(build_corpus(CorpusConfig(val_documents=300, seed=5), "val")) == \
        "4427912d1f82804645f1873b6369073751a29632db37b55c261d84a2acf36236"


def test_corpus_is_the_same_for_any_number_of_workers(tmp_path, tok, monkeypatch):
    import nanoseek.data.corpus as corpus_mod
    monkeypatch.setattr(corpus_mod, "CHUNK_DOCUMENTS", 100)              # 3 chunks: 100, 100, 50
    cfg = CorpusConfig(n_documents=250, val_documents=20, seed=2, workers=0)
    serial = build_corpus(cfg)
    parallel = build_corpus(CorpusConfig(n_documents=250, val_documents=20, seed=2, workers=2))
    assert [d.text for d in parallel] == [d.text for d in serial] and len(serial) == 250
    assert [d.text for d in serial[:100]] == [d.text for d in build_corpus(CorpusConfig(n_documents=100, seed=2))]
    assert len({d.text for d in serial[100:200]} & {d.text for d in serial[:100]}) < 10   # chunks draw afresh
    train_dir, _ = prepare_corpus(tmp_path / "data", CorpusConfig(n_documents=250, val_documents=20, seed=2,
                                                                   workers=2), tok, progress=False)
    index = load_index(train_dir)
    assert np.fromfile(train_dir / "shard_00000.bin", dtype=np.uint16).tolist() == _stream(tok, [d.text for d in serial])
    assert index["meta"]["kinds"] == dict(Counter(d.kind for d in serial))
    assert index["meta"]["wrong"] == sum(not d.correct for d in serial)
    assert index["meta"]["languages"] == dict(Counter(d.language for d in serial))
    calls = []
    monkeypatch.setattr(corpus_mod, "write_shards", lambda *a, **k: calls.append(a))
    prepare_corpus(tmp_path / "data", cfg, tok, progress=False)
    assert calls == []                                 # the worker count is not part of the corpus: reused
    with pytest.raises(UserError, match="workers"):
        CorpusConfig(workers=-1)


def test_tokenizer_command(tmp_path):
    from nanoseek.cli import main
    out = tmp_path / "tok"
    assert main(["tokenizer", "--out", str(out), "--vocab-size", "300", "--set", "n_documents=300"]) == 0
    tok = Tokenizer.load(out)
    assert 266 < len(tok) <= 300 and tok.token_id("<think>") == 3
    assert main(["tokenizer", "--out", str(tmp_path / "bad"), "--set", "n_documents=-1"]) == 2
    assert main(["tokenizer", "--out", str(tmp_path / "bad"), "--vocab-size", "100"]) == 2
    assert not (tmp_path / "bad").exists()


def test_corpus_check_and_slip_knobs():
    """At 0 (the default) the corpus is unchanged document for document; at check=1, slip=1 every arithmetic
    and linear reasoning document checks its steps and catches one slip."""
    plain = build_corpus(CorpusConfig(n_documents=200, workers=0))
    assert [d.text for d in plain] == [d.text for d in build_corpus(CorpusConfig(n_documents=200, workers=0,
                                                                                 check=0.0, slip=0.0))]
    checked = build_corpus(CorpusConfig(n_documents=200, workers=0, check=1.0, slip=1.0, wrong=0.0, short=0.0,
                                        register=0.0, mixed=0.0))
    reasoning = [d for d in checked if d.family in ("arithmetic", "linear") and d.kind in ("r1zero", "think", "plain")]
    assert reasoning and all("Wait, redo" in d.text for d in reasoning)
