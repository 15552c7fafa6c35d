"""Data for supervised fine-tuning: JSONL records in TRL's formats → tokens with a per-token loss mask.

Record formats (TRL's dataset types; one per file, detected from its first record):

    messages                          {"messages": [{"role", "content"}, ...]}                (conversational)
    prompt/response                   {"prompt": str, "response": str, "system"?: str}        (conversational)
    prompt/completion                 {"prompt": str, "completion": str}                      (plain text)
    conversational prompt/completion  {"prompt": [messages], "completion": [messages]}        (conversational)
    text                              {"text": str}                                           (plain text)

Every record becomes TRL's prompt/completion pair: `messages` is an empty prompt and the whole conversation as
the completion, `prompt/response` the prompt [system?, user] and the completion [assistant], `text` an empty
prompt. A conversational record may carry "tools" (a list of JSON schemas the template renders).

Conversations are rendered with the tokenizer's chat template exactly as transformers renders them; plain
text is tokenized as `tokenizer(prompt + completion)` (the tokenizer's own bos, if its post-processor adds
one) followed by eos, as TRL does. The loss mask is the intersection of two switches named as TRL names them:
- completion_only_loss (default on): the loss is on the completion only; off = on the whole sequence. On a
  conversation the completion starts where the rendered prompt with its generation prompt stops matching
  the rendered conversation.
- assistant_only_loss (default on; conversational data only): the loss is on the assistant turns, their
  content and what the template closes them with (R1 §2.3.1 cold start, §2.3.3 SFT: the model learns to
  answer, not to ask). A template with `{% generation %}` blocks marks them itself (transformers'
  `return_assistant_tokens_mask`); for any other template turn i of the conversation spans from where
  rendering messages[:i] with the generation prompt stops matching to the end of messages[:i+1] rendered,
  as long as later turns leave that text unchanged (a template that rewrites earlier turns, e.g. drops their
  reasoning, trains none of them).
Both are found on the TEXT, as character spans: a token is trained when it overlaps one (transformers' rule),
which stays right when BPE merges across a seam.

An example longer than seq_len + 1 tokens (seq_len inputs and their next-token labels) is cut to its first
(truncation_mode "keep_start") or last ("keep_end") seq_len + 1 tokens, or dropped ("drop"); one left with no
trained token is skipped. `SFTDataset.stats` counts each case.

Batches are right-padded to the longest row of the batch with pad_id (labels -100 there); causal attention
never lets a real token see the padding after it, so no attention mask is needed. With packing, examples are
placed whole into rows of at most seq_len inputs (best-fit decreasing, none split); the labels stay per
example (the last input of an example predicts its own last token, never the next example's first), but
attention crosses example boundaries inside a row and positions continue through it. Order and resumption
are those of PackedDataset (a seeded permutation per epoch, position in state_dict).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from nanoseek.data.shards import BatchIterator, EpochCursor, check_model_fit
from nanoseek.errors import UserError
from nanoseek.files import iter_jsonl
from nanoseek.tokenizer import has_generation_blocks

IGNORE = -100
TRUNCATION_MODES = ("keep_start", "keep_end", "drop")
FORMATS = {   # format name -> its shape, as the error for an unrecognised record lists them
    "messages": '{"messages": [{"role": str, "content": str}, ...]}',
    "prompt/response": '{"prompt": str, "response": str}',
    "prompt/completion": '{"prompt": str, "completion": str}',
    "conversational prompt/completion": '{"prompt": [messages], "completion": [messages]}',
    "text": '{"text": str}',
}


def check_truncation_mode(mode: str, key: str = "truncation_mode") -> None:
    if mode not in TRUNCATION_MODES:
        raise UserError(f"{key}={mode!r}: use one of {', '.join(TRUNCATION_MODES)}")


def record_format(record) -> str | None:
    """The FORMATS name of a record (a bare message list counts as `messages`), None when none fits."""
    if isinstance(record, list):
        return "messages"
    if not isinstance(record, dict):
        return None
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(record.get("messages"), list):
        return "messages"
    if isinstance(prompt, str) and isinstance(record.get("response"), str):
        return "prompt/response"
    if isinstance(prompt, str) and isinstance(completion, str):
        return "prompt/completion"
    if isinstance(prompt, list) and isinstance(completion, list):
        return "conversational prompt/completion"
    if isinstance(record.get("text"), str):
        return "text"
    return None


def to_examples(located: Iterable[tuple[str, object]], one_format: bool = False) -> list[dict]:
    """(where, record) pairs → examples {"prompt", "completion"[, "tools"]}; a UserError naming the record
    when one fits no format, or (one_format: a file's records) another format than the first record's."""
    examples, first = [], None
    for where, record in located:
        fmt = record_format(record)
        if fmt is None:
            keys = f"keys {sorted(record)}" if isinstance(record, dict) else f"a JSON {type(record).__name__}"
            raise UserError(f"{where}: expected an SFT record, one of {'; '.join(FORMATS.values())}; got {keys}")
        if first is None:
            first = (fmt, where)
        elif one_format and fmt != first[0]:
            raise UserError(f"{where}: a {fmt} record, but the first one ({first[1]}) is {first[0]}; "
                            f"use one format per file")
        examples.append(to_example(record, fmt, where))
    return examples


def to_example(record, fmt: str, where: str) -> dict:
    """A record of format `fmt` as TRL's prompt/completion pair, its messages checked."""
    if fmt == "text":
        return {"prompt": "", "completion": record["text"]}
    if fmt == "prompt/completion":
        return {"prompt": record["prompt"], "completion": record["completion"]}
    if fmt == "messages":
        prompt, completion = [], record if isinstance(record, list) else record["messages"]
    elif fmt == "prompt/response":
        prompt = ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + [
            {"role": "user", "content": record["prompt"]}]
        completion = [{"role": "assistant", "content": record["response"]}]
    else:
        prompt, completion = record["prompt"], record["completion"]
        if not completion:           # an empty prompt is a `messages` record (what to_examples returns)
            raise UserError(f"{where}: the completion needs at least one message")
    for m in prompt + completion:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise UserError(f'{where}: each message needs string "role" and "content", got {m!r:.80}')
    if not any(m["role"] == "assistant" for m in prompt + completion):
        raise UserError(f"{where}: no assistant message, so nothing to train on; add the response")
    tools = record.get("tools") if isinstance(record, dict) else None
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise UserError(f'{where}: "tools" must be a list of JSON schemas (objects)')
    return {"prompt": prompt, "completion": completion, **({"tools": tools} if tools else {})}


def to_messages(record, where: str = "record") -> list[dict]:
    """The whole conversation of a conversational record (any format but the plain-text ones) as one list."""
    example = to_examples([(where, record)])[0]
    if isinstance(example["completion"], str):
        raise UserError(f"{where}: a plain-text record has no messages")
    return example["prompt"] + example["completion"]


def load_chat_records(path: str | Path) -> list[dict]:
    """Read an SFT JSONL file strictly into examples: a bad line is a UserError naming file:line (unlike
    metrics files, training data is never silently skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"SFT data file {path} not found; pass a JSONL file of SFT records "
                        f"(messages, prompt/response, prompt/completion or text)")
    records = to_examples(((f"{path}:{line_no}", record) for line_no, record in iter_jsonl(path)), one_format=True)
    if not records:
        raise UserError(f"SFT data file {path} is empty; it needs one JSON record per line")
    return records


def _common_prefix(a: str, b: str) -> int:
    return len(os.path.commonprefix([a, b]))


def assistant_spans(tok, messages: list[dict], text: str, tools=None) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `text` (the conversation rendered), for a template without
    `{% generation %}` blocks: turn i from where messages[:i] + generation prompt stops matching to the end
    of messages[:i+1], when `text` still begins with the latter."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], add_generation_prompt=True, tools=tools) if i else ""
        upto = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False, tools=tools)
        if text.startswith(upto):
            spans.append((_common_prefix(before, upto), len(upto)))
    return spans


def tokenize_example(tok, example: dict, *, assistant_only_loss: bool = True,
                     completion_only_loss: bool = True) -> tuple[list[int], list[bool]]:
    """Token ids of an example ({"prompt", "completion"[, "tools"]}, or a message list) and, per token,
    whether it carries loss."""
    if isinstance(example, list):
        example = {"prompt": [], "completion": example}
    prompt, completion = example["prompt"], example["completion"]
    if isinstance(completion, str):                                   # plain text, no template
        text = prompt + completion
        ids, offsets = tok.encode_offsets(text, add_special_tokens=True)
        trained = _covered(offsets, [(len(prompt) if completion_only_loss else 0, len(text))], n_chars=len(text))
        if not ids or ids[-1] != tok.eos_id:                          # TRL appends eos to the completion
            ids, trained = ids + [tok.eos_id], trained + [True]
        trained[-1] = True
        return ids, trained
    messages, tools = prompt + completion, example.get("tools")
    text, generation = tok.render_chat_spans(messages, add_generation_prompt=False, tools=tools)
    regions = [[(0, len(text))]]
    if completion_only_loss and prompt:
        start = _common_prefix(text, tok.apply_chat_template(prompt, add_generation_prompt=True, tools=tools))
        regions.append([(start, len(text))])
    if assistant_only_loss:
        regions.append(generation if has_generation_blocks(tok.chat_template)
                       else assistant_spans(tok, messages, text, tools))
    ids, offsets = tok.encode_offsets(text)
    return ids, _covered(offsets, *regions, n_chars=len(text))


def _covered(offsets, *regions: list[tuple[int, int]], n_chars: int) -> list[bool]:
    """Per token: does its character span [start, end) overlap a span of every region (an intersection)?"""
    chars = np.ones(n_chars, dtype=bool)
    for spans in regions:
        inside = np.zeros(n_chars, dtype=bool)
        for a, b in spans:
            inside[a:b] = True
        chars &= inside
    csum = np.concatenate([[0], np.cumsum(chars)])
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2).clip(0, n_chars)
    return (csum[bounds[:, 1]] > csum[bounds[:, 0]]).tolist()


def pack(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: item indices grouped into bins of total length <= capacity, no item split.
    Each item (longest first) goes into the fullest bin it fits in; ties keep the input order."""
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []                  # (room left, bin), sorted: the best fit is the first >= length
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        j = bisect.bisect_left(free, (lengths[i], -1))
        if j < len(free):
            room, b = free.pop(j)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], b))
    return bins


class SFTDataset(BatchIterator):
    """SFT examples as an endless, checkpointable iterator of right-padded (input_ids, labels) [B, T<=seq_len].

    stats: {"examples", "truncated", "dropped", "no_loss", "kept", "rows", "trained_tokens"} (truncated: longer
    than seq_len + 1 tokens and cut; dropped: longer and left out by truncation_mode "drop"; no_loss: no
    trained token, after any cut; rows: training rows, fewer than kept examples with packing)."""

    def __init__(self, records: str | Path | list, tok, seq_len: int, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, model_config=None,
                 assistant_only_loss: bool = True, completion_only_loss: bool = True,
                 truncation_mode: str = "keep_start", packing: bool = False):
        check_model_fit(model_config, tok.vocab_size, seq_len)
        check_truncation_mode(truncation_mode)
        source = str(records) if isinstance(records, (str, Path)) else "records"
        examples = (load_chat_records(records) if isinstance(records, (str, Path))
                    else to_examples((f"record {i}", r) for i, r in enumerate(records)))
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.pad_id = tok.pad_id
        limit = seq_len + 1                                   # seq_len inputs + the label of the last one
        kept: list[tuple[np.ndarray, np.ndarray]] = []        # (input_ids [n], labels [n]) per example, n <= seq_len
        stats = dict.fromkeys(("examples", "truncated", "dropped", "no_loss"), 0)
        for example in examples:
            ids, trained = tokenize_example(tok, example, assistant_only_loss=assistant_only_loss,
                                            completion_only_loss=completion_only_loss)
            stats["examples"] += 1
            if len(ids) > limit:
                if truncation_mode == "drop":
                    stats["dropped"] += 1
                    continue
                stats["truncated"] += 1
                cut = slice(0, limit) if truncation_mode == "keep_start" else slice(len(ids) - limit, None)
                ids, trained = ids[cut], trained[cut]
            labels = np.where(np.asarray(trained[1:], dtype=bool), ids[1:], IGNORE)   # label of t = token t+1
            if (labels == IGNORE).all():
                stats["no_loss"] += 1
                continue
            kept.append((np.asarray(ids[:-1], dtype=np.int64), labels.astype(np.int64)))
        if packing:
            kept = [tuple(np.concatenate(part) for part in zip(*(kept[i] for i in sorted(row))))
                    for row in pack([ids.size for ids, _ in kept], seq_len)]
        self.examples = kept                                  # the rows a batch draws from
        self.stats = {**stats, "kept": stats["examples"] - stats["dropped"] - stats["no_loss"], "rows": len(kept),
                      "trained_tokens": int(sum((lab != IGNORE).sum() for _, lab in kept))}
        if len(kept) < batch_size * world_size:
            raise UserError(f"{source}: {len(kept)} usable rows from {stats['examples']} examples "
                            f"({self.describe()}), fewer than one batch of {batch_size * world_size}; "
                            f"raise seq_len, check the loss switches or add data")
        self.cursor = EpochCursor(len(kept), seed, shuffle)

    def describe(self) -> str:
        """One line of what happened to the examples (the run logs it)."""
        s = self.stats
        return (f"{s['truncated']} longer than seq_len+1={self.seq_len + 1} tokens truncated, {s['dropped']} longer "
                f"ones dropped, {s['no_loss']} with no trained token skipped")

    def next_batch(self, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        b = batch_size or self.batch_size
        picked = [self.examples[int(i)] for i in self.batch_indices(b)]
        width = max(ids.size for ids, _ in picked)
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long)
        labels = torch.full((b, width), IGNORE, dtype=torch.long)
        for row, (ids, lab) in enumerate(picked):
            input_ids[row, :ids.size] = torch.from_numpy(ids)
            labels[row, :lab.size] = torch.from_numpy(lab)
        return input_ids, labels
