"""Generated tokens/s: nanoseek's rollout engine vs transformers' `generate`, same model, batch, prompt, length,
and the fraction of the memory-bandwidth roofline each reaches.

Two models (random weights: speed does not depend on them), each saved in the hub layout and loaded by
transformers, so both engines run the very same weights:
- `small`: the DeepSeek-V3-shaped preset (MLA, 64 routed experts, 206M activated parameters);
- `qwen0.5b`: a Qwen2.5-0.5B-shaped dense model (GQA 14/2, tied embeddings, q/k/v bias), config built here.
Both engines sample (temperature 1) exactly the asked number of new tokens per row (no stop token), after
one untimed warm-up call each (for nanoseek that call captures the CUDA graph of the batch-size bucket, as
the first rollout of a training run does).

Roofline: a decode step must read every weight it uses once (for an MoE, the dense parts plus the experts
the batch touches: E·(1 − (1 − K/E)^B) per layer, uniform routing) and the cache of every row (on average
half the new tokens plus the prompt); that many bytes over the copy bandwidth measured in the same run
(a large device-to-device copy, bytes read + written) is the fastest possible step. `roofline` = that time
/ the measured time per step. Prints one JSON line per (model, engine, batch).

    python benchmarks/rollout.py --quick                                # CPU: tiny preset, batch 1 and 8
    python benchmarks/rollout.py --models small qwen0.5b --batch 1 64 256   # GPU, bf16
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import tempfile
import time
from unittest import mock

import torch

from common import kernel_table  # benchmarks/ is the script's directory, first on sys.path
from nanoseek.config import DenseConfig, ModelConfig
from nanoseek.hf import save_pretrained
from nanoseek.model import attention, build_model, packed_linears
from nanoseek.sampling import rollout
from nanoseek.sampling.rollout import SamplingConfig, generate

# Qwen2.5-0.5B's published config.json (hidden 896, 24 layers, 14 query / 2 kv heads, tied embeddings)
QWEN_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, rope_theta=1_000_000.0,
                max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True, model_type="qwen2")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device) -> float | None:
    """Bytes/s of a 2 GiB device-to-device copy (read + write counted), median of 10 after 3 warm-ups."""
    if device.type != "cuda":
        return None
    a = torch.empty(2**30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    del a, b
    return 2 * 2**30 / sorted(times)[len(times) // 2]


def step_bytes(model, cfg, B: int, prompt_len: int, new_tokens: int, bytes_per: int) -> float:
    """The fewest bytes one decode step of B rows reads: weights used once + the filled cache of every row."""
    e = cfg.hidden_size * cfg.vocab_size                                   # embedding: one row per token read
    n = sum(p.numel() for p in model.parameters()) - e
    if getattr(cfg, "tie_word_embeddings", False):
        n += e                                                             # the head is the embedding matrix
    if hasattr(model, "mtp"):
        n -= sum(p.numel() for p in model.mtp.parameters())                # not used when decoding
    if getattr(cfg, "n_routed_experts", 0):
        E, K = cfg.n_routed_experts, cfg.num_experts_per_tok
        per_expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
        layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
        touched = E * (1 - (1 - K / E) ** B)
        n -= layers * (E - touched) * per_expert
        per_token_cache = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    else:
        per_token_cache = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim
    filled = prompt_len + new_tokens / 2
    return (n + B * filled * per_token_cache) * bytes_per


def time_nanoseek(model, prompts, new_tokens: int, decode: str, amp: bool) -> float:
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, stop=[], decode=decode)
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):   # amp: the GRPO trainer's setting
        generate(model, prompts, cfg, [], 0, gen)                          # warm-up: captures the bucket's graph
        sync(device)
        t0 = time.perf_counter()
        g = generate(model, prompts, cfg, [], 0, gen)
        sync(device)
    assert int(g.lengths.sum()) == len(prompts) * new_tokens
    return time.perf_counter() - t0


def profile_step(model, runs: int = 3, top: int = 20) -> dict:
    """Kernels one decode step launches and their summed GPU time (torch.profiler over `runs` steps as `generate`
    runs them: graph replays, in the engine's packed-linear context), and the `top` kernels by time."""
    dec = next(reversed(rollout._DECODERS[model].values()))
    from torch.profiler import ProfilerActivity, profile
    with torch.no_grad(), packed_linears.decoding():
        dec.step(None)                                                  # outside the profile: a first replay
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(runs):
                dec.step(None)
            torch.cuda.synchronize()
    return {"graph": dec.use_graph, **kernel_table(prof, runs, top)}


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


def model_config(name: str):
    return DenseConfig(**QWEN_05B) if name == "qwen0.5b" else ModelConfig.preset(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU-sized: tiny preset, batch 1 and 8, 32 + 64 tokens")
    ap.add_argument("--models", nargs="+", default=["small"], help="presets and/or qwen0.5b")
    ap.add_argument("--preset", help="one model (same as --models NAME)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--hf-new-tokens", type=int, default=None,
                    help="new tokens per row for transformers (default --new-tokens; fewer keeps its slow small-"
                         "batch runs short: its per-token time barely depends on the length at these sizes)")
    ap.add_argument("--hf-batch", type=int, nargs="*", default=None, help="batches for transformers (default all)")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), bf16, fp32 or amp (nanoseek "
                    "only: fp32 master weights under bf16 autocast, as the GRPO trainer decodes)")
    ap.add_argument("--decode", nargs="+", default=["auto"],
                    help="nanoseek decode modes: auto, dynamic, static, graph, compiled")
    ap.add_argument("--attention", nargs="+", default=["kernel"], choices=["kernel", "sdpa"],
                    help="a decode step's attention on CUDA: the split-K kernel (nanoseek.kernels.decode_attention) "
                         "or SDPA / the bmm path it replaces (A/B in one run)")
    ap.add_argument("--packed-linears", nargs="+", default=["on"], choices=["on", "off"],
                    help="decode steps with q|k|v and gate|up packed into one GEMM each (nanoseek.model.packed_linears) or "
                         "as separate GEMMs (A/B in one run)")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--compiled-batch", type=int, nargs="*", default=None,
                    help="batches where decode mode 'compiled' runs (default all; each bucket compiles once)")
    ap.add_argument("--profile", action="store_true", help="GPU: kernels per decode step and their summed time")
    args = ap.parse_args()
    if args.preset:
        args.models = [args.preset]
    if args.quick:
        args.models, args.batch, args.prompt_len, args.new_tokens = ["tiny"], [1, 8], 32, 64
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = args.dtype == "amp"
    if amp:
        args.skip_transformers = True
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "amp": torch.float32}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    bw = copy_bandwidth(device)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    if bw:
        print(json.dumps({"copy_bandwidth_TBps": round(bw / 1e12, 3), "device": where}), flush=True)
    bytes_per = 2 if (amp or dtype == torch.bfloat16) else 4

    for name in args.models:
        torch.manual_seed(0)
        cfg = model_config(name)
        with torch.device(device):                                         # initialise on the device: fast
            model = build_model(cfg).to(dtype=dtype).eval()
        hf_model = None
        if not args.skip_transformers:
            from transformers import AutoModelForCausalLM
            with tempfile.TemporaryDirectory() as d:
                save_pretrained(model, d)
                hf_model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).to(device).eval()
        for B in args.batch:
            g = torch.Generator().manual_seed(B)
            prompts = torch.randint(10, cfg.vocab_size, (B, args.prompt_len), generator=g).tolist()
            floor = step_bytes(model, cfg, B, args.prompt_len, args.new_tokens, bytes_per) / bw if bw else None
            row = dict(model=name, batch=B, prompt_len=args.prompt_len,
                       dtype="amp" if amp else str(dtype).removeprefix("torch."), device=where, torch=torch.__version__)

            def report(engine: str, seconds: float, n_new: int, **extra) -> float:
                per_step = seconds / n_new
                out = {"engine": engine, **extra, **row, "new_tokens": n_new, "seconds": round(seconds, 3),
                       "new_tokens_per_s": round(B * n_new / seconds, 1), "ms_per_step": round(per_step * 1e3, 3)}
                if floor:
                    out["roofline"] = round(floor / per_step, 3)
                print(json.dumps(out), flush=True)
                return B * n_new / seconds

            best = 0.0
            for decode, kind, packed in itertools.product(args.decode, args.attention, args.packed_linears):
                if decode == "compiled" and args.compiled_batch is not None and B not in args.compiled_batch:
                    continue
                attention.DECODE_KERNEL = kind == "kernel"
                rollout._DECODERS.pop(model, None)                          # decoders built with another setting
                tag = dict(decode=decode)
                tag.update({"attention": kind} if len(args.attention) > 1 else {})
                tag.update({"packed_linears": packed} if len(args.packed_linears) > 1 else {})
                # "off": the packed groups run as separate GEMMs (the weights stay packed; only speed differs)
                unpacked = mock.patch.object(packed_linears, "decoding", contextlib.nullcontext) if packed == "off" \
                    else contextlib.nullcontext()
                try:
                    with unpacked:
                        t_ns = time_nanoseek(model, prompts, args.new_tokens, decode, amp)
                except Exception as e:                                      # one mode failing must not hide the rest
                    print(json.dumps({"engine": "nanoseek", **tag, **row,
                                      "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}), flush=True)
                    continue
                extra = profile_step(model) if args.profile and decode != "dynamic" and bw else {}
                best = max(best, report("nanoseek", t_ns, args.new_tokens, **tag, **extra))
            if hf_model is not None and (args.hf_batch is None or B in args.hf_batch):
                n_hf = args.hf_new_tokens or args.new_tokens
                import transformers
                hf = report("transformers", time_transformers(hf_model, prompts, n_hf), n_hf,
                            version=transformers.__version__)
                print(json.dumps({"model": name, "batch": B, "speedup": round(best / hf, 2)}), flush=True)
        del model, hf_model
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
