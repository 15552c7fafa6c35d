"""Chat data for supervised fine-tuning: JSONL records → chat-template tokens with the loss on responses only.

A record is {"prompt": str, "response": str, "system"?: str} or {"messages": [{"role", "content"}, ...]}.
It is rendered with the tokenizer's chat template (ours or a user's), and only the assistant turns — their
content and what the template closes them with (our eos, a user template's end-of-turn) — carry a label;
everything else is -100, so the model learns to answer, not to ask (R1 §2.3.1 cold start, §2.3.3 SFT).

Which tokens belong to an assistant turn is found on the TEXT, not on token ids: rendering messages[:i]
with the generation prompt gives where turn i starts, rendering messages[:i+1] where it ends, and the
tokens whose character offset falls inside are trained. This stays right when BPE merges across the seam.
Turns that the template renders differently once later turns follow (templates that drop earlier
reasoning) get no loss.

Batches are right-padded to the longest example of the batch with pad_id (labels -100 there); causal
attention never lets a real token see the padding after it, so no attention mask is needed. Order and
resumption are those of PackedDataset (a seeded permutation per epoch, position in state_dict).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nanoseek.data.shards import BatchIterator, EpochCursor, check_model_fit
from nanoseek.errors import UserError
from nanoseek.files import iter_jsonl

IGNORE = -100


def load_chat_records(path: str | Path) -> list[dict]:
    """Read a chat JSONL file strictly: a bad line is a UserError naming file:line (unlike metrics files,
    training data is never silently skipped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"SFT data file {path} not found; pass a JSONL file of prompt/response records")
    records = [to_messages(record, f"{path}:{line_no}") for line_no, record in iter_jsonl(path)]
    if not records:
        raise UserError(f"SFT data file {path} is empty; it needs one JSON record per line")
    return records


def to_messages(record: dict | list, where: str = "record") -> list[dict]:
    """Normalise a record (or an already normalised message list) to a message list, checking its shape."""
    if isinstance(record, list):
        messages = record
    elif isinstance(record, dict) and isinstance(record.get("messages"), list):
        messages = record["messages"]
    elif isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        messages = ([{"role": "system", "content": record["system"]}] if record.get("system") else []) + [
            {"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
    else:
        raise UserError(f'{where}: expected {{"prompt": str, "response": str}} or {{"messages": [...]}}')
    for m in messages:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise UserError(f'{where}: each message needs string "role" and "content", got {m!r:.80}')
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError(f"{where}: no assistant message, so nothing to train on; add the response")
    return messages


def tokenize_chat(tok, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is part of an assistant turn."""
    text = tok.apply_chat_template(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        upto = tok.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if upto.startswith(before) and text.startswith(upto):
            spans.append((len(before), len(upto)))
    ids, offsets = tok.encode_offsets(text)
    trained = [any(a <= start < b for a, b in spans) for start, _ in offsets]
    return ids, trained


class SFTDataset(BatchIterator):
    """Chat examples as an endless, checkpointable iterator of right-padded (input_ids, labels) [B, T<=seq_len]."""

    def __init__(self, records: str | Path | list[dict], tok, seq_len: int, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, rank: int = 0, world_size: int = 1, model_config=None):
        check_model_fit(model_config, tok.vocab_size, seq_len)
        source = str(records) if isinstance(records, (str, Path)) else "records"
        conversations = (load_chat_records(records) if isinstance(records, (str, Path))
                         else [to_messages(r, f"record {i}") for i, r in enumerate(records)])
        self.seq_len, self.batch_size, self.rank, self.world_size = seq_len, batch_size, rank, world_size
        self.pad_id = tok.pad_id
        self.examples: list[tuple[np.ndarray, np.ndarray]] = []   # (input_ids [n], labels [n]) per example
        self.n_dropped = 0                                        # longer than seq_len + 1 tokens
        for messages in conversations:
            ids, trained = tokenize_chat(tok, messages)
            if len(ids) > seq_len + 1:
                self.n_dropped += 1
                continue
            labels = np.where(np.asarray(trained[1:], dtype=bool), ids[1:], IGNORE)   # label of t = token t+1
            if (labels != IGNORE).any():
                self.examples.append((np.asarray(ids[:-1], dtype=np.int64), labels.astype(np.int64)))
        if len(self.examples) < batch_size * world_size:
            raise UserError(f"{source}: {len(self.examples)} usable examples ({self.n_dropped} longer than seq_len+1="
                            f"{seq_len + 1} tokens dropped), fewer than one batch of {batch_size * world_size}; "
                            f"raise seq_len or add data")
        self.cursor = EpochCursor(len(self.examples), seed, shuffle)

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
