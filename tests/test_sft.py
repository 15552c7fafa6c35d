"""SFT data as TRL users expect it: the record formats, the loss masks of completion_only_loss and
assistant_only_loss (checked against transformers' tokenization and TRL's construction of its masks),
`{% generation %}` templates, truncation with counts, packing, and what an `sft` run reports."""

import json

import pytest
import torch

from nanoseek.cli import main
from nanoseek.data import SFTDataset, load_chat_records
from nanoseek.data.sft import IGNORE, pack, tokenize_example
from nanoseek.errors import UserError
from nanoseek.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
GENERATION = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['role'] == 'assistant' %}"
              "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
              "{% else %}{{ m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
SPECIALS = ["<|begin_of_text|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _pairs(n, long_every=0):
    """n (question, answer) pairs; every long_every-th answer long."""
    out = []
    for i in range(n):
        answer = f"{i} + {i} = {2 * i}" + (" and so on" * 12 if long_every and i % long_every == 0 else "")
        out.append((f"What is {i} + {i}? café", answer))
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A BPE tokenizer whose post-processor adds a bos (as Llama's does), with a ChatML template."""
    from tokenizers import Tokenizer as Backend, decoders, models, pre_tokenizers, processors, trainers
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    texts = [f"{q} {a}" for q, a in _pairs(60, 3)] * 5
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    backend.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
    path = tmp_path_factory.mktemp("hf")
    backend.save(str(path / "tokenizer.json"))
    return path


def _tokenizers(hf_dir, tmp_path, template=CHATML):
    folder = tmp_path / "tok"
    folder.mkdir(exist_ok=True)
    (folder / "tokenizer.json").write_bytes((hf_dir / "tokenizer.json").read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "chat_template": template}))
    return Tokenizer.load(folder), transformers.AutoTokenizer.from_pretrained(str(folder))


def _write(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _targets(ds, row):
    """The (position, target) pairs that carry loss in row `row` of the dataset's first batch."""
    _, y = ds.next_batch()
    return [(t, v) for t, v in enumerate(y[row].tolist()) if v != IGNORE]


# ---------------------------------------------------------------- formats

FORMAT_RECORDS = {
    "messages": lambda q, a: {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]},
    "prompt/response": lambda q, a: {"prompt": q, "response": a},
    "conversational prompt/completion": lambda q, a: {"prompt": [{"role": "user", "content": q}],
                                                      "completion": [{"role": "assistant", "content": a}]},
}


@pytest.mark.parametrize("fmt", sorted(FORMAT_RECORDS))
def test_conversational_formats_train_the_answer(fmt, hf_dir, tmp_path):
    """All three conversational formats give the same rows: the loss on the answer and its <|im_end|>\\n,
    equal to TRL's completion mask (prompt with generation prompt tokenized, the rest trained)."""
    tok, hf = _tokenizers(hf_dir, tmp_path)
    pairs = _pairs(4)
    data = _write(tmp_path / "d.jsonl", [FORMAT_RECORDS[fmt](q, a) for q, a in pairs])
    ds = SFTDataset(data, tok, 64, 4, shuffle=False)
    x, y = ds.next_batch()
    for row, (q, a) in enumerate(pairs):
        prompt = [{"role": "user", "content": q}]
        prompt_ids = hf.apply_chat_template(prompt, add_generation_prompt=True, return_dict=True)["input_ids"]
        full = hf.apply_chat_template(prompt + [{"role": "assistant", "content": a}], return_dict=True)["input_ids"]
        assert full[:len(prompt_ids)] == prompt_ids
        n = len(full) - 1
        assert x[row, :n].tolist() == full[:-1]
        expected = [full[t + 1] if t + 1 >= len(prompt_ids) else IGNORE for t in range(n)]   # TRL's mask, shifted
        assert y[row, :n].tolist() == expected
        assert tok.decode([v for v in expected if v != IGNORE]) == a + "<|im_end|>\n"


def test_plain_prompt_completion_is_tokenized_as_trl_does(hf_dir, tmp_path):
    """Plain strings: tokenizer(prompt + completion) (its post-processor's bos included) + eos, no template;
    completion_only_loss on trains the completion and eos, off the whole sequence."""
    tok, hf = _tokenizers(hf_dir, tmp_path)
    pairs = [(q, " " + a) for q, a in _pairs(3)]
    data = _write(tmp_path / "plain.jsonl", [{"prompt": q, "completion": a} for q, a in pairs])
    for completion_only in (True, False):
        ds = SFTDataset(data, tok, 64, 3, shuffle=False, completion_only_loss=completion_only)
        x, y = ds.next_batch()
        for row, (q, a) in enumerate(pairs):
            full = hf(q + a)["input_ids"] + [hf.eos_token_id]
            assert full[0] == hf.convert_tokens_to_ids("<|begin_of_text|>")
            n = len(full) - 1
            assert x[row, :n].tolist() == full[:-1]
            trained = [v for v in y[row].tolist() if v != IGNORE]
            if completion_only:
                n_prompt = len(hf(q)["input_ids"])
                assert trained == full[n_prompt:] and tok.decode(trained) == a + "<|im_end|>"
            else:
                assert trained == full[1:]


def test_text_records_train_everything(hf_dir, tmp_path):
    tok, hf = _tokenizers(hf_dir, tmp_path)
    ds = SFTDataset([{"text": "Once upon a time, café."}], tok, 64, 1)
    full = hf("Once upon a time, café.")["input_ids"] + [hf.eos_token_id]
    assert [v for _, v in _targets(ds, 0)] == full[1:]


def test_record_errors_name_the_record_and_the_formats(hf_dir, tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "q", "response": "a"}, {"question": "q", "answer": "a"}])
    with pytest.raises(UserError) as e:
        load_chat_records(bad)
    msg = str(e.value)
    assert msg.startswith(f"{bad}:2: expected") and "\n" not in msg
    assert all(s in msg for s in ('"messages"', '"response"', '"completion"', '"text"', "['answer', 'question']"))
    mixed = _write(tmp_path / "mixed.jsonl", [{"prompt": "q", "response": "a"}, {"prompt": "q", "completion": "a"}])
    with pytest.raises(UserError, match=f"{mixed}:2: a prompt/completion record, but the first one .*:1. is "
                                        "prompt/response"):
        load_chat_records(mixed)
    tools = _write(tmp_path / "tools.jsonl", [{"messages": [{"role": "assistant", "content": "a"}], "tools": "x"}])
    with pytest.raises(UserError, match="tools"):
        load_chat_records(tools)


# ---------------------------------------------------------------- loss switches

def test_assistant_only_loss_switch(hf_dir, tmp_path):
    """messages: on, the loss is on both assistant turns only; off, on every token."""
    tok, hf = _tokenizers(hf_dir, tmp_path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 1?"},
                {"role": "assistant", "content": "2"}, {"role": "user", "content": "2 + 2?"},
                {"role": "assistant", "content": "4 ✓"}]
    full = hf.apply_chat_template(messages, return_dict=True)["input_ids"]
    on = SFTDataset([{"messages": messages}], tok, 128, 1)
    assert tok.decode([v for _, v in _targets(on, 0)]) == "2<|im_end|>\n4 ✓<|im_end|>\n"
    off = SFTDataset([{"messages": messages}], tok, 128, 1, assistant_only_loss=False)
    assert [v for _, v in _targets(off, 0)] == full[1:]
    # prompt/completion, assistant_only_loss off: completion_only_loss still keeps the loss off the prompt
    record = {"prompt": messages[:4], "completion": messages[4:]}
    only = SFTDataset([record], tok, 128, 1, assistant_only_loss=False)
    assert tok.decode([v for _, v in _targets(only, 0)]) == "4 ✓<|im_end|>\n"
    both_off = SFTDataset([record], tok, 128, 1, assistant_only_loss=False, completion_only_loss=False)
    assert [v for _, v in _targets(both_off, 0)] == full[1:]
    # both on: the intersection (the completion's assistant turn)
    assert _targets(SFTDataset([record], tok, 128, 1), 0) == _targets(only, 0)


def test_generation_template_masks_equal_transformers(hf_dir, tmp_path):
    """A `{% generation %}` template marks the assistant tokens itself; the trained targets are exactly
    transformers' `assistant_masks` (the turn's "\\n" after <|im_end|> is outside the block, so untrained)."""
    tok, hf = _tokenizers(hf_dir, tmp_path, GENERATION)
    messages = [{"role": "user", "content": "1 + 1?"}, {"role": "assistant", "content": "2"},
                {"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4 ✓"}]
    out = hf.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    ds = SFTDataset([{"messages": messages}], tok, 128, 1)
    assert _targets(ds, 0) == [(t - 1, ids[t]) for t in range(1, len(ids)) if mask[t]]
    assert tok.decode([v for _, v in _targets(ds, 0)]) == "2<|im_end|>4 ✓<|im_end|>"


# ---------------------------------------------------------------- truncation and packing

def test_long_examples_truncated_and_counted(hf_dir, tmp_path):
    tok, hf = _tokenizers(hf_dir, tmp_path)
    records = [{"prompt": q, "response": a} for q, a in _pairs(12, long_every=3)]
    lengths = [len(hf.apply_chat_template([{"role": "user", "content": r["prompt"]},
                                           {"role": "assistant", "content": r["response"]}])["input_ids"])
               for r in records]
    seq_len = 40
    long = [n > seq_len + 1 for n in lengths]
    assert 0 < sum(long) < len(records)
    start = SFTDataset(records, tok, seq_len, 2, shuffle=False)
    assert start.stats["truncated"] == sum(long) and start.stats["dropped"] == 0 and start.stats["kept"] == 12
    full = tok.encode(tok.apply_chat_template([{"role": "user", "content": records[0]["prompt"]},
                                               {"role": "assistant", "content": records[0]["response"]}], False))
    assert long[0] and start.examples[0][0].tolist() == full[:seq_len]
    end = SFTDataset(records, tok, seq_len, 2, shuffle=False, truncation_mode="keep_end")
    assert end.examples[0][0].tolist() == full[-seq_len - 1:-1] and end.examples[0][1][-1] == full[-1]
    drop = SFTDataset(records, tok, seq_len, 2, shuffle=False, truncation_mode="drop")
    assert drop.stats["dropped"] == sum(long) and len(drop.examples) == 12 - sum(long)
    with pytest.raises(UserError, match="truncation_mode='middle'"):
        SFTDataset(records, tok, seq_len, 2, truncation_mode="middle")


def test_pack_best_fit_decreasing():
    # 7 and 5 open bins (room 3, 5); 4 best fits the room of 5, 3 the room of 3; 2 fits nowhere: a third bin
    assert pack([5, 3, 7, 2, 4], 10) == [[2, 1], [0, 4], [3]]
    lengths = [((i * 37) % 23) + 1 for i in range(200)]
    bins = pack(lengths, 30)
    assert sorted(i for b in bins for i in b) == list(range(200))
    assert all(sum(lengths[i] for i in b) <= 30 for b in bins)
    assert len(bins) <= sum(lengths) / 30 * 1.25


def test_packing_keeps_examples_whole_with_their_labels(hf_dir, tmp_path):
    tok, _ = _tokenizers(hf_dir, tmp_path)
    records = [{"prompt": q, "response": a} for q, a in _pairs(30, long_every=7)]
    plain = SFTDataset(records, tok, 64, 1, shuffle=False)
    packed = SFTDataset(records, tok, 64, 1, shuffle=False, packing=True)
    assert packed.stats["rows"] < plain.stats["rows"] == 30
    assert packed.stats["trained_tokens"] == plain.stats["trained_tokens"]
    pieces = {(ids.tobytes(), lab.tobytes()) for ids, lab in plain.examples}
    found = 0
    for ids, lab in packed.examples:
        assert ids.size <= 64
        at = 0
        while at < ids.size:                     # the row is whole unpacked examples, back to back
            match = [n for n in range(1, ids.size - at + 1)
                     if (ids[at:at + n].tobytes(), lab[at:at + n].tobytes()) in pieces]
            assert match, "a row holds a cut example"
            at += match[-1]
            found += 1
    assert found == 30


# ---------------------------------------------------------------- the run

def test_sft_run_reports_truncation(base_checkpoint, tmp_path, capsys):
    """`nanoseek sft` on plain prompt/completion data with some examples over seq_len: it trains on all of
    them, logs the count and writes it to sft_data.json."""
    records = [{"prompt": f"{a} + {a} = ", "completion": f"{2 * a}" + (" carry" * 30 if a % 4 == 0 else "")}
               for a in range(24)]
    data = _write(tmp_path / "plain.jsonl", records)
    out = tmp_path / "run"
    argv = ["sft", "--init", str(base_checkpoint), "--out", str(out), "--no-progress", "--set", f'data.path="{data}"',
            "--set", "train.steps=1,train.batch_size=4,train.seq_len=32,data.val_examples=0,eval.problems=0"]
    assert main(argv) == 0
    stats = json.loads((out / "sft_data.json").read_text())["train"]
    assert stats["truncated"] == 6 and stats["kept"] == 24 and stats["dropped"] == stats["no_loss"] == 0
    assert "6 longer than seq_len+1=33 tokens truncated" in capsys.readouterr().err
    bad = ["--set", "data.truncation_mode=cut"]
    assert main([*argv[:4], str(tmp_path / "run2"), *argv[5:], *bad]) == 2
    assert "data.truncation_mode='cut'" in capsys.readouterr().err and not (tmp_path / "run2").exists()
