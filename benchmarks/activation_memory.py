"""What `train.activation_checkpointing` saves: the activations a training step keeps for its backward, and the
step time, with and without checkpointing, on a Qwen3-0.6B-shaped dense model (hidden 1024, 16 query / 8 kv
heads of 128, MLP 3072; fewer layers and a small vocabulary: the layers' share grows with their number, and
the output head is not checkpointed).

"Kept" counts every tensor autograd saves for the backward (`torch.autograd.graph.saved_tensors_hooks`), minus
the parameters themselves, once per storage; it is the activation memory of the step, independent of the
allocator, so a CPU measures it as a GPU would. Prints one JSON line per setting.

    python benchmarks/activation_memory.py                       # CPU: 4 layers, batch 1 x 512 tokens, fp32
    python benchmarks/activation_memory.py --device cuda --precision bf16 --seq 4096
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from nanoseek.config import DenseConfig
from nanoseek.model import build_model, set_activation_checkpointing
from nanoseek.run import autocast


def measure(cfg: DenseConfig, checkpoint: bool, batch: int, seq: int, device: torch.device, precision: str) -> dict:
    torch.manual_seed(0)
    model = set_activation_checkpointing(build_model(cfg).to(device).train(), checkpoint)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = max(kept.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    times = []
    for _ in range(2):                                   # the second step is timed (the first warms up)
        kept.clear()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device, precision):
            loss = model(ids, labels=ids).loss
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    mib = sum(kept.values()) / 2**20
    return {"checkpointing": checkpoint, "layers": cfg.num_hidden_layers, "tokens": batch * seq,
            "precision": precision, "kept_mib": round(mib, 1), "step_s": round(times[-1], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    cfg = DenseConfig(vocab_size=args.vocab, hidden_size=1024, intermediate_size=3072, num_hidden_layers=args.layers,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, model_type="qwen3",
                      max_position_embeddings=max(args.seq, 512), rope_theta=1e6, tie_word_embeddings=True)
    for checkpoint in (False, True):
        print(json.dumps(measure(cfg, checkpoint, args.batch, args.seq, torch.device(args.device), args.precision)))


if __name__ == "__main__":
    main()
