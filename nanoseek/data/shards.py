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
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice
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
                 meta: dict | Callable[[], dict] | None = None, progress: bool = True, encoded: bool = False) -> dict:
    """Tokenise `texts` into `out_dir` (built in a temp dir, renamed into place when complete). Returns the index.

    Streaming: `texts` is consumed once, in batches, and each shard file is appended to as documents arrive, so
    memory holds one batch, never the corpus (`texts` may be a generator). `meta` may be a callable, read after
    the last text, for a streamed corpus that counts its documents as they pass. `encoded`: `texts` is already
    `encode_documents` batches (tokenised elsewhere, e.g. in worker processes). Linear in the corpus: the shard
    being filled keeps a running token count (summing the group on every document made it quadratic).
    """
    total = len(texts) if hasattr(texts, "__len__") and not encoded else None
    batches = texts if encoded else encode_documents(texts, tok)
    if progress:
        batches = track(batches, f"tokenising {Path(out_dir).name}", transient=True,
                        total=None if total is None else -(-total // ENCODE_BATCH))
    with atomic_dir(out_dir) as tmp:
        writer = ShardWriter(tmp, token_dtype(tok), shard_tokens)
        for tokens, lengths in batches:
            writer.add(tokens, lengths)
        shards = writer.close()
        if not shards:
            raise UserError(f"no documents to write into {out_dir}; the corpus is empty (raise n_documents)")
        index = {"format": FORMAT, "dtype": np.dtype(writer.dtype).name, "vocab_size": tok.vocab_size,
                 "bos_id": tok.bos_id, "eos_id": tok.eos_id, "tokenizer": tokenizer_fingerprint(tok),
                 "n_documents": sum(s["n_documents"] for s in shards), "n_tokens": sum(s["n_tokens"] for s in shards),
                 "shards": shards, "meta": (meta() if callable(meta) else meta) or {}}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return index


ENCODE_BATCH = 1024     # documents per encode_batch call: the Rust tokenizer spreads each over the cores


def token_dtype(tok) -> type:
    """uint16 when every id fits, else uint32: half the disk and page cache for vocabularies up to 65536."""
    return np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32


def encode_documents(texts: Iterable[str | list[int]], tok, batch: int = ENCODE_BATCH
                     ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`texts` as batches (tokens [sum of lengths] in `token_dtype(tok)`, lengths [documents] int64), each
    document `bos ids eos` (bos only when the tokenizer has one; neither added twice). Texts are encoded by
    `tok.encode_batch` (the Rust tokenizer spreads a batch over all cores); a document given as token ids (a
    list, not a str) is taken as it is."""
    it = iter(texts)
    while docs := list(islice(it, batch)):
        yield _encode_batch(docs, tok)


def _encode_batch(docs: list[str | list[int]], tok) -> tuple[np.ndarray, np.ndarray]:
    bos, eos = tok.bos_id, tok.eos_id
    encoded = iter(tok.encode_batch([d for d in docs if isinstance(d, str)]))
    pieces, lengths = [], np.empty(len(docs), dtype=np.int64)
    for i, d in enumerate(docs):
        ids = next(encoded) if isinstance(d, str) else list(d)
        head = [bos] if bos is not None and (not ids or ids[0] != bos) else []
        tail = [] if ids and ids[-1] == eos else [eos]
        pieces += (head, ids, tail)
        lengths[i] = len(head) + len(ids) + len(tail)
    tokens = np.fromiter(chain.from_iterable(pieces), dtype=token_dtype(tok), count=int(lengths.sum()))
    return tokens, lengths


class ShardWriter:
    """Appends documents to `shard_NNNNN.bin` files in `folder`; a shard closes at the first document end at or
    past `shard_tokens` (shards end on document boundaries). Work per batch is O(batch) plus O(log batch) per
    shard closed: the fill level is a running total, never a re-sum of the documents written."""

    def __init__(self, folder: Path, dtype, shard_tokens: int):
        if shard_tokens < 1:
            raise UserError(f"shard_tokens={shard_tokens} must be >= 1")
        self.folder, self.dtype, self.shard_tokens = Path(folder), dtype, shard_tokens
        self.shards: list[dict] = []
        self._file, self._tokens, self._documents = None, 0, 0     # the open shard and its fill

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents: tokens [sum(lengths)] back to back, lengths [documents] (each >= 1)."""
        ends = np.cumsum(lengths)                    # [documents] end offset of each document in `tokens`
        first, offset = 0, 0                         # first document not yet written, and where it starts
        while first < len(ends):
            # the first document whose end brings the open shard to shard_tokens or more
            last = int(np.searchsorted(ends, offset + self.shard_tokens - self._tokens, side="left"))
            if last >= len(ends):                    # the rest fit without filling the shard
                self._append(tokens[offset:], len(ends) - first)
                return
            self._append(tokens[offset:ends[last]], last + 1 - first)
            self._finish()
            first, offset = last + 1, int(ends[last])

    def close(self) -> list[dict]:
        """Finish the last shard; the shards' index entries, in order."""
        if self._file is not None:
            self._finish()
        return self.shards

    def _append(self, tokens: np.ndarray, documents: int) -> None:
        if self._file is None:
            self._file = open(self.folder / f"shard_{len(self.shards):05d}.bin", "wb")
        tokens.astype(self.dtype, copy=False).tofile(self._file)
        self._tokens += tokens.size
        self._documents += documents

    def _finish(self) -> None:
        self._file.close()
        self.shards.append({"file": Path(self._file.name).name, "n_tokens": self._tokens,
                            "n_documents": self._documents})
        self._file, self._tokens, self._documents = None, 0, 0


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
