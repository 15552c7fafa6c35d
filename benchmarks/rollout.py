"""Generated tokens/s: nanoseek's rollout engine vs transformers' `generate`, same model, batch, prompt, length.

The model is built once from a preset (random weights: speed does not depend on them), saved in the hub
layout and loaded by transformers' DeepseekV3ForCausalLM, so both engines run the very same weights. Both
sample (temperature 1) exactly `--new-tokens` tokens per row (no stop token), after one untimed warm-up
call each. Prints one JSON line per (engine, batch) and a speed-up line per batch.

    python benchmarks/rollout.py --quick                         # CPU: tiny preset, batch 1 and 8
    python benchmarks/rollout.py --preset small --batch 1 64     # H100: docs/DESIGN.md §8 shape, bf16, 64 + 256 tokens
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from nanoseek.config import ModelConfig
from nanoseek.hf import save_pretrained
from nanoseek.model import build_model
from nanoseek.sampling.rollout import SamplingConfig, generate


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_nanoseek(model, prompts, new_tokens: int, decode: str, amp: bool) -> float:
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, stop=[], decode=decode)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):   # amp: the GRPO trainer's setting
        generate(model, prompts, SamplingConfig(max_new_tokens=4, stop=[], decode=decode), [], 0, gen)   # warm-up
        sync(device)
        t0 = time.perf_counter()
        g = generate(model, prompts, cfg, [], 0, gen)
        sync(device)
    assert int(g.lengths.sum()) == len(prompts) * new_tokens
    return time.perf_counter() - t0


def time_transformers(hf_model, prompts, new_tokens: int) -> float:
    device = hf_model.device
    ids = torch.tensor(prompts, device=device)
    kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, pad_token_id=0, eos_token_id=None)
    hf_model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kw)                                 # warm-up
    sync(device)
    t0 = time.perf_counter()
    out = hf_model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    sync(device)
    assert out.shape[1] == ids.shape[1] + new_tokens
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU-sized: tiny preset, batch 1 and 8, 32 + 64 tokens")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp32 or amp (nanoseek "
                    "only: fp32 master weights under bf16 autocast, as the GRPO trainer decodes)")
    ap.add_argument("--decode", default="auto", help="nanoseek decode mode: auto, dynamic, static, graph")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.preset, args.batch, args.prompt_len, args.new_tokens = "tiny", [1, 8], 32, 64
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = args.dtype == "amp"
    if amp:
        args.skip_transformers = True
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "amp": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)

    torch.manual_seed(0)
    cfg = ModelConfig.preset(args.preset)
    model = build_model(cfg).to(device=device, dtype=dtype).eval()
    hf_model = None
    if not args.skip_transformers:
        from transformers import AutoModelForCausalLM
        with tempfile.TemporaryDirectory() as d:
            save_pretrained(model, d)
            hf_model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    for B in args.batch:
        g = torch.Generator().manual_seed(B)
        prompts = torch.randint(10, cfg.vocab_size, (B, args.prompt_len), generator=g).tolist()
        n = B * args.new_tokens
        row = dict(preset=args.preset, batch=B, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                   dtype="amp" if amp else str(dtype).removeprefix("torch."), device=where, torch=torch.__version__)
        t_ns = time_nanoseek(model, prompts, args.new_tokens, args.decode, amp)
        print(json.dumps({"engine": "nanoseek", "decode": args.decode, **row, "seconds": round(t_ns, 3),
                          "new_tokens_per_s": round(n / t_ns, 1)}), flush=True)
        if hf_model is not None:
            t_hf = time_transformers(hf_model, prompts, args.new_tokens)
            import transformers
            print(json.dumps({"engine": "transformers", "version": transformers.__version__, **row,
                              "seconds": round(t_hf, 3), "new_tokens_per_s": round(n / t_hf, 1)}), flush=True)
            print(json.dumps({"batch": B, "speedup": round(t_hf / t_ns, 2)}), flush=True)


if __name__ == "__main__":
    main()
