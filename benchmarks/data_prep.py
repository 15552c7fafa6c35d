"""Data preparation at scale (issue 17): corpus generation, tokenisation and shard writing, 10K to 1M documents.

    python benchmarks/data_prep.py                                  # 10K, 100K and 1M documents, every core
    python benchmarks/data_prep.py --sizes 10000,100000 --workers 2
    python benchmarks/data_prep.py --sizes 1000000 --phases total  # the end-to-end figure alone

For each size, one JSON line per phase, each with seconds, documents/s and tokens/s:
    total      `prepare_corpus` end to end (what `nanoseek pretrain` runs; a 1-document val part): generation
               in `corpus.workers` processes streamed into tokenisation and shard writing in this one, so the
               phases overlap and memory holds a few chunks (peak_rss_mb: this process; children's separately)
    generate   the corpus texts alone (CorpusConfig.workers processes, chunks of CHUNK_DOCUMENTS documents)
    tokenize   `encode_documents` over those texts (the Rust tokenizer's batch encoding on every core)
    write      `ShardWriter` over those tokens (uint16 shards of 2^24 tokens)
plus the cores this process may use, the worker count, and the load average before and after (the machine may
be shared: a loaded machine shows in `load`). The tokenizer is BPE with 1024 tokens (the tiny model's) trained on
the first 20K documents, before the clock starts.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402
from nanoseek.data.corpus import CorpusConfig, corpus_texts, prepare_corpus, resolve_workers  # noqa: E402
from nanoseek.data.shards import ShardWriter, encode_documents, token_dtype  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402


def measure(n: int, workers: int | None, tok: Tokenizer, scratch: Path, base: dict, phases: set[str]) -> None:
    cfg = CorpusConfig(n_documents=n, val_documents=1, workers=workers)

    def record(phase: str, seconds: float, n_tokens: int, **extra) -> None:
        emit({**base, "documents": n, "phase": phase, "seconds": round(seconds, 3), "docs_per_s": round(n / seconds),
              "tokens": n_tokens, "tokens_per_s": round(n_tokens / seconds), "load": os.getloadavg()[0], **extra})

    t0 = time.perf_counter()
    train_dir, _ = prepare_corpus(scratch / f"total{n}", cfg, tok, progress=False)
    total = time.perf_counter() - t0
    n_tokens = sum(s.stat().st_size for s in train_dir.glob("shard_*.bin")) // token_dtype(tok)().itemsize
    record("total", total, n_tokens, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
           children_peak_rss_mb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
    shutil.rmtree(scratch / f"total{n}")
    if phases == {"total"}:
        return

    t0 = time.perf_counter()
    texts = [text for chunk, _ in corpus_texts(cfg) for text in chunk]
    record("generate", time.perf_counter() - t0, n_tokens)
    t0 = time.perf_counter()
    batches = list(encode_documents(texts, tok))
    record("tokenize", time.perf_counter() - t0, n_tokens)
    del texts
    assert sum(int(lengths.sum()) for _, lengths in batches) == n_tokens, "phases and total disagree"
    (scratch / "write").mkdir()
    t0 = time.perf_counter()
    writer = ShardWriter(scratch / "write", token_dtype(tok), 1 << 24)
    for tokens, lengths in batches:
        writer.add(tokens, lengths)
    writer.close()
    record("write", time.perf_counter() - t0, n_tokens)
    shutil.rmtree(scratch / "write")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated document counts")
    parser.add_argument("--workers", type=int, default=None,
                        help="corpus.workers: generation processes (default: every available core; 0/1: in process)")
    parser.add_argument("--phases", default="total,generate,tokenize,write",
                        help="\"total\" alone skips the separate phases (half the time)")
    parser.add_argument("--scratch", default=None, help="where shards are written (default: a temp dir)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    cores = len(os.sched_getaffinity(0))
    base = {"bench": "data_prep", "date": datetime.date.today().isoformat(),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "cores": cores,
            "workers": resolve_workers(args.workers), "tokenizer_threads": os.environ.get("RAYON_NUM_THREADS", cores)}
    tok = Tokenizer.train((t for chunk, _ in corpus_texts(CorpusConfig(n_documents=20_000, workers=0))
                           for t in chunk), 1024)
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        for n in sizes:
            measure(n, args.workers, tok, Path(scratch), base, set(args.phases.split(",")))


if __name__ == "__main__":
    main()
