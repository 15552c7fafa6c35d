"""Cross-entropy over the vocabulary: the whole-logits loss (`deepseek.cross_entropy`) vs the chunked one
(`train.loss_chunk`, nanoseek/model/chunked_ce.py), forward + backward, eager.

    python benchmarks/chunked_ce.py                                  # CPU: the tiny model's loss shape
    python benchmarks/chunked_ce.py --rows 16384 --vocab 129280 --device cuda --dtype bfloat16 --chunk 2048

One JSON line per (loss, chunk): median milliseconds and, on CUDA, the peak memory above the logits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, header, time_ms  # noqa: E402
from nanoseek.model.chunked_ce import chunked_cross_entropy  # noqa: E402
from nanoseek.model.deepseek import cross_entropy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4096, help="tokens (the tiny recipe: 16 x 256)")
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--dtype", default="float32", help="logits dtype: float32 (CPU fp32) or bfloat16 (autocast)")
    parser.add_argument("--chunk", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    logits = torch.randn(args.rows, args.vocab, device=device, dtype=getattr(torch, args.dtype), requires_grad=True)
    labels = torch.randint(0, args.vocab, (args.rows,), device=device)
    runs = [("whole", 0, cross_entropy)] + [("chunked", c, lambda x, y, c=c: chunked_cross_entropy(x, y, c))
                                            for c in args.chunk]
    for name, chunk, fn in runs:
        def step():
            logits.grad = None
            fn(logits, labels).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        ms = time_ms(step, device, warmup=2, iters=7)
        extra = {"peak_mib_above_inputs": (torch.cuda.max_memory_allocated() - base) / 2**20} if device.type == "cuda" else {}
        emit({**header(device), "bench": "cross_entropy", "loss": name, "chunk": chunk, "rows": args.rows,
              "vocab": args.vocab, "dtype": args.dtype, "ms": round(ms, 2), **extra})


if __name__ == "__main__":
    main()
