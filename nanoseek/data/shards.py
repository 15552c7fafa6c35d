"""Token shards on disk and the packed, resumable pretraining iterator.

A corpus is tokenised once into flat `shard_NNNNN.bin` files (uint16 when the vocabulary fits, else uint32)
plus `index.json`; training memory-maps them, so a corpus larger than RAM costs nothing to open. Each
document is stored as `bos ids eos` (bos only when the tokenizer has one), back to back.

Packing (nanoGPT / nanochat style, no padding, no cross-document masking): a shard of N tokens holds
(N-1)//T rows; row r is tokens[r·T : r·T+T+1], so neighbouring rows share one token and every token but
the first of a shard is a target exactly once. A batch is B rows; input_ids = row[:-1], labels = row[1:]
(already aligned: labels[:, t] is the target of position t, as the model expects).

Order: each epoch visits every row once in a seeded permutation (numpy PCG64 keyed by (seed, epoch)), so
the whole data stream is a pure function of (seed, position). The position — epoch and rows consumed — is
the iterator's state_dict; loading it replays exactly the batches that followed. Under data parallelism
every rank walks the same order and takes its own slice of each global batch (B·world rows).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from rich.progress import track

from nanoseek.errors import UserError
from nanoseek.files import atomic_dir
from nanoseek.tokenizer import check_vocab_fits

INDEX = "index.json"
FORMAT = "nanoseek-shards-1"


def check_model_fit(model_config, vocab_size: int | None = None, seq_len: int | None = None) -> None:
    """UserError when token ids or sequence length exceed what `model_config` (ModelConfig/DenseConfig) can embed."""
    if model_config is None:
        return
    if vocab_size is not None:
        check_vocab_fits(vocab_size, model_config.vocab_size)
    max_pos = model_config.max_position_embeddings
    if seq_len is not None and seq_len > max_pos:
        raise UserError(f"sequence length {seq_len} exceeds the model's max_position_embeddings {max_pos}; "
                        f"set train.seq_len <= {max_pos} (or extend the context with `nanoseek extend`)")


def tokenizer_fingerprint(tok) -> str:
    """Short hash of the tokenizer's JSON: shards remember which tokenizer made them."""
    return hashlib.sha256(tok.backend.to_str().encode()).hexdigest()[:16]


# ---- writing ----
def write_shards(texts: Iterable[str | list[int]], tok, out_dir: str | Path, *, shard_tokens: int = 1 << 24,
                 meta: dict | None = None, progress: bool = True) -> dict:
    """Tokenise `texts` into `out_dir` (built in a temp dir, renamed into place when complete). Returns the index."""
    texts = list(texts)
    if not texts:
        raise UserError(f"no documents to write into {out_dir}; the corpus is empty (raise n_documents)")
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    shards, group = [], []
    with atomic_dir(out_dir) as tmp:
        for ids in _document_ids(texts, tok, f"tokenising {Path(out_dir).name}", progress):
            group.append(ids)
            if sum(g.size for g in group) >= shard_tokens:   # shards end on document boundaries
                shards.append(_write_shard(tmp / f"shard_{len(shards):05d}.bin", group, dtype))
                group = []
        if group:
            shards.append(_write_shard(tmp / f"shard_{len(shards):05d}.bin", group, dtype))
        index = {"format": FORMAT, "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size,
                 "bos_id": tok.bos_id, "eos_id": tok.eos_id, "tokenizer": tokenizer_fingerprint(tok),
                 "n_documents": len(texts), "n_tokens": sum(s["n_tokens"] for s in shards),
                 "shards": shards, "meta": meta or {}}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return index


def _document_ids(texts: list, tok, description: str, progress: bool, chunk: int = 1024):
    """Each text as `bos ids eos` (int64 arrays), encoded in batches (the Rust tokenizer runs them in parallel);
    a document given as token ids (a list, not a str) is taken as it is."""
    bos, eos = tok.bos_id, tok.eos_id
    for start in track(range(0, len(texts), chunk), description, transient=True, disable=not progress):
        docs = texts[start:start + chunk]
        encoded = iter(tok.encode_batch([d for d in docs if isinstance(d, str)]))
        for ids in (next(encoded) if isinstance(d, str) else list(d) for d in docs):
            if bos is not None and (not ids or ids[0] != bos):
                ids = [bos] + ids
            if not ids or ids[-1] != eos:
                ids = ids + [eos]
            yield np.asarray(ids, dtype=np.int64)


def _write_shard(file: Path, docs: list[np.ndarray], dtype) -> dict:
    arr = np.concatenate(docs).astype(dtype)
    arr.tofile(file)
    return {"file": file.name, "n_tokens": int(arr.size), "n_documents": len(docs)}


def load_index(path: str | Path) -> dict:
    path = Path(path)
    file = path / INDEX
    if not file.is_file():
        raise UserError(f"{path} holds no token shards ({INDEX} missing); build them with "
                        f"nanoseek.data.prepare_corpus or `nanoseek pretrain`")
    try:
        index = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file} is not valid JSON ({e}); delete {path} and rebuild the shards") from None
    if index.get("format") != FORMAT:
        raise UserError(f"{file} is not a {FORMAT} index; delete {path} and rebuild the shards")
    for s in index["shards"]:
        f = path / s["file"]
        if not f.is_file() or f.stat().st_size != s["n_tokens"] * np.dtype(index["dtype"]).itemsize:
            raise UserError(f"shard {f} is missing or truncated; delete {path} and rebuild the shards")
    return index


# ---- reading ----
class EpochCursor:
    """A resumable walk over n items: epoch after epoch, each a seeded permutation (or 0..n-1 unshuffled)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.epoch, self.pos = 0, 0
        self._perm_epoch, self._perm = -1, None

    def _order(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm = rng.permutation(self.n) if self.shuffle else np.arange(self.n)
            self._perm_epoch = self.epoch
        return self._perm

    def take(self, k: int) -> np.ndarray:
        """The next k item indices (crossing into the next epoch when this one runs out)."""
        out = []
        while k:
            got = self._order()[self.pos:self.pos + k]
            out.append(got)
            k -= got.size
            self.pos += got.size
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return np.concatenate(out)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "n": self.n, "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("n", "seed", "shuffle"):
            if state[key] != mine[key]:
                raise UserError(f"data position in the checkpoint was saved for {key}={state[key]}, but the data "
                                f"now has {key}={mine[key]}; resume with the same data and seed, or start a new run")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


class BatchIterator:
    """Shared by PackedDataset and SFTDataset: an endless iterator of next_batch() whose position is the
    cursor's. Subclasses set self.cursor, self.batch_size, self.rank, self.world_size and next_batch."""

    def batch_indices(self, batch_size: int) -> np.ndarray:
        """This rank's slice of the next global batch (batch_size * world_size items)."""
        return self.cursor.take(batch_size * self.world_size)[self.rank * batch_size:(self.rank + 1) * batch_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return self.cursor.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.cursor.load_state_dict(state)


class PackedDataset(BatchIterator):
    """Fixed-length rows from token shards; an endless, checkpointable iterator of (input_ids, labels) [B, T]."""

    def __init__(self, path: str | Path, seq_len: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, model_config=None):
        self.path, self.seq_len, self.batch_size = Path(path), seq_len, batch_size
        self.rank, self.world_size = rank, world_size
        self.index = load_index(path)
        check_model_fit(model_config, self.index["vocab_size"], seq_len)
        if seq_len < 1 or batch_size < 1:
            raise UserError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        dtype = np.dtype(self.index["dtype"])
        self.shards = [np.memmap(self.path / s["file"], dtype=dtype, mode="r", shape=(s["n_tokens"],))
                       for s in self.index["shards"]]
        rows = [max(0, (s.size - 1) // seq_len) for s in self.shards]
        self.row_starts = np.concatenate([[0], np.cumsum(rows)])    # global row id -> (shard, row)
        self.n_rows = int(self.row_starts[-1])
        if self.n_rows < batch_size * world_size:
            raise UserError(f"{path} has {self.index['n_tokens']} tokens: {self.n_rows} rows of {seq_len + 1}, fewer "
                            f"than one batch of {batch_size * world_size}; add documents or lower batch_size/seq_len")
        self.cursor = EpochCursor(self.n_rows, seed, shuffle)

    def row(self, i: int) -> np.ndarray:
        """Global row i: seq_len + 1 tokens."""
        s = int(np.searchsorted(self.row_starts, i, side="right")) - 1
        start = (i - int(self.row_starts[s])) * self.seq_len
        return self.shards[s][start:start + self.seq_len + 1]

    def next_batch(self, batch_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.batch_indices(batch_size or self.batch_size)
        block = torch.from_numpy(np.stack([self.row(int(i)) for i in rows]).astype(np.int64))  # [B, T+1]
        return block[:, :-1], block[:, 1:]
