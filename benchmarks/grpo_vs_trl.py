"""Seconds per GRPO step: nanoseek's trainer vs TRL's `GRPOTrainer`, same model, prompts, group, lengths and loss.

Both train the very same weights (a random-weight dense model saved once in the hub layout, loaded by each), on
prompts of the same kind (nanoseek's arithmetic and linear-equation problems under the model's chat template),
one optimizer step per generation batch of `prompts x group` completions of `new_tokens` tokens (random weights
never say eos early, so every completion has the full length in both), DAPO's token-mean loss, β = 0, μ = 1,
bf16 autocast over fp32 master weights, micro-batches of `micro` rows; nanoseek otherwise with its defaults
(`train.compile = "auto"`: on CUDA a dense model's update runs eager, its log-prob arithmetic compiled). The
reward is the task verifier in both (it scores random text 0, which costs the same in both). TRL generates with
transformers (no vLLM).

A step is timed from its start to its end, rollouts, rewards and update included: nanoseek's `step_time` in
metrics.jsonl, TRL's between `on_step_begin` and `on_step_end`. The first `--warmup` steps (model load, CUDA
graph capture, allocator growth) are dropped; the record gives the median, min and max of the rest and how far
min/max lie from the median, and `speedup` = TRL's median / nanoseek's. TRL is optional: without it the TRL
side is skipped. One JSON line per engine, then the comparison.

    python benchmarks/grpo_vs_trl.py --quick                     # CPU: a 2-layer dense model, 2 steps
    python benchmarks/grpo_vs_trl.py --model qwen0.5b --steps 8   # GPU: Qwen2.5-0.5B's shape, 16 x 8 x 256
    python benchmarks/grpo_vs_trl.py --model qwen0.5b --engines nanoseek --profile-update   # where the update goes
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import emit, header, kernel_table  # benchmarks/ is the script's directory, first on sys.path
from nanoseek.cli import process_defaults
from nanoseek.config import DenseConfig
from nanoseek.hf import save_pretrained
from nanoseek.model import build_model
from nanoseek.rl.trainer import RLConfig, train_rl
from nanoseek.recipe import load_recipe
from nanoseek.tasks import FAMILIES, sample_problems

QWEN_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                num_key_value_heads=2, rope_theta=1_000_000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
                tie_word_embeddings=True, model_type="qwen2", vocab_size=151936)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=2048, model_type="qwen2")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
FAMILY_NAMES = ["arithmetic", "linear"]


def write_model(root: Path, shape: dict) -> Path:
    """A random-weight dense model and a ChatML byte-level BPE tokenizer in one hub-layout folder. The BPE is
    trained on task prompts; filler tokens pad its vocabulary to the model's (a 0.5B shape keeps its 152K-row
    embedding and head, a large part of its cost)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [p.prompt + "\n" + p.solution for p in sample_problems(FAMILY_NAMES, 2000, seed=1)]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    vocab = shape.get("vocab_size", backend.get_vocab_size())
    backend.add_tokens([f"<filler_{i}>" for i in range(vocab - backend.get_vocab_size())])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  chat_template=CHATML)
    path = root / "model"
    torch.manual_seed(0)
    save_pretrained(build_model(DenseConfig(**{**shape, "vocab_size": vocab})), path)
    tok.save_pretrained(path)                 # beside the weights (save_pretrained writes the folder atomically)
    return path


def spread(times: list[float]) -> dict:
    med = statistics.median(times)
    return {"median_s": round(med, 3), "min_s": round(min(times), 3), "max_s": round(max(times), 3),
            "within_pct": round(100 * max(med - min(times), max(times) - med) / med, 1), "steps_timed": len(times)}


class GCPauses:
    """Python's full (generation 2) garbage collections while it runs: how many, and seconds each."""

    def __enter__(self) -> "GCPauses":
        self.pauses: list[float] = []
        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                self.t0 = time.perf_counter()
            else:
                self.pauses.append(round(time.perf_counter() - self.t0, 3))


class UpdateProfile:
    """--profile-update: torch.profiler around the policy update of the first timed step (nanoseek's
    `update_policy`, wrapped for the run and restored after): the update's wall time under the profiler, its
    kernels and their summed time, and the top kernels (common.kernel_table)."""

    def __init__(self, at_call: int):
        import nanoseek.rl.trainer as rl_trainer
        self.module, self.at_call, self.calls, self.result = rl_trainer, at_call, 0, {}

    def __enter__(self):
        self.real = self.module.update_policy
        self.module.update_policy = self.update
        return self

    def __exit__(self, *exc):
        self.module.update_policy = self.real

    def update(self, *args, **kwargs):
        self.calls += 1
        if self.calls != self.at_call:
            return self.real(*args, **kwargs)
        from torch.profiler import ProfilerActivity, profile
        cuda = torch.cuda.is_available()
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        sync()
        t0 = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            out = self.real(*args, **kwargs)
            sync()
            wall = time.perf_counter() - t0                 # before the profiler's own shutdown work
        self.result = {"update_profiled_ms": round(wall * 1e3, 1), **kernel_table(prof, top=30)}
        return out


def run_nanoseek(path: Path, out: Path, a) -> tuple[list[float], dict]:
    """Step times, and each step's rollout and update throughput from metrics.jsonl."""
    if a.automatic_gc:                       # the ablation: the loop without nanoseek.run.steps_with_gc
        import nanoseek.rl.trainer as rl_trainer
        rl_trainer.steps_with_gc = iter
    sets = [f"train.steps={a.steps}", f"train.prompts={a.prompts}", f"train.micro_batch={a.micro}",
            f"train.precision={a.precision}", f"train.init={path}", "checkpoint.every=0",
            f"tasks.names={json.dumps(FAMILY_NAMES)}", "tasks.template=chat", f"sampling.max_new_tokens={a.new_tokens}",
            "sampling.temperature=1.0", "sampling.stop=[]", f"rl.group_size={a.group}", "rl.beta=0.0", "rl.mu=1",
            'rl.aggregation="dapo"', "eval.problems=0", "optim.lr=1e-6", "optim.warmup_steps=0", *a.set]
    cfg = load_recipe(RLConfig, None, sets)
    profiler = UpdateProfile(a.warmup + 1) if a.profile_update else contextlib.nullcontext()
    with GCPauses() as gc_pauses, profiler:
        train_rl(cfg, out, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "step_time" in r]
    detail = {k: [round(r.get(k, 0.0)) for r in records] for k in ("gen_tokens_per_s", "train_tokens_per_s")}
    detail["step_end_unix_s"] = [r["time"] for r in records]     # to line steps up with outside samples (clocks)
    detail["full_gc_pauses_s"] = gc_pauses.pauses
    if a.profile_update:
        detail["update_profile"] = profiler.result
    if torch.cuda.is_available():
        detail["peak_allocated_GB"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        detail["peak_reserved_GB"] = round(torch.cuda.max_memory_reserved() / 2**30, 1)
        detail["alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries", 0)
    return [r["step_time"] for r in records], detail


def run_trl(path: Path, out: Path, a) -> tuple[list[float], dict] | None:
    try:
        import datasets
        import pyarrow as pa
        from transformers import TrainerCallback
        from trl import GRPOConfig, GRPOTrainer
    except ImportError:
        return None
    problems = sample_problems(FAMILY_NAMES, a.prompts * (a.steps + 1), seed=2)
    by_prompt = {p.prompt: p for p in problems}
    table = pa.table({"prompt": [[{"role": "user", "content": p.prompt}] for p in problems],
                      "question": [p.prompt for p in problems]})
    data = datasets.Dataset(table, fingerprint="nanoseek-grpo-bench")   # no hashing of the table (see the doc)

    def accuracy(prompts, completions, question, **kwargs) -> list[float]:
        """The task verifier, as nanoseek's rule reward scores the same completions."""
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [FAMILIES[by_prompt[q].family].score(by_prompt[q], t) for q, t in zip(question, texts)]

    class Clock(TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    cuda = torch.cuda.is_available()
    args = GRPOConfig(output_dir=str(out), max_steps=a.steps, per_device_train_batch_size=a.micro,
                      gradient_accumulation_steps=a.prompts * a.group // a.micro, num_generations=a.group,
                      max_completion_length=a.new_tokens, temperature=1.0, beta=0.0, loss_type="dapo",
                      num_iterations=1, learning_rate=1e-6, bf16=cuda and a.precision == "bf16", use_cpu=not cuda,
                      logging_steps=1, save_strategy="no", report_to="none", shuffle_dataset=False, seed=0)
    clock = Clock()
    GRPOTrainer(model=str(path), reward_funcs=accuracy, args=args, train_dataset=data, callbacks=[clock]).train()
    return clock.times, {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CPU-sized: a 2-layer dense model, 2+1 steps, 4 x 2 x 16")
    ap.add_argument("--model", default="qwen0.5b", choices=["qwen0.5b", "tiny"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--micro", type=int, default=64, help="rows per forward/backward (TRL: per-device batch); "
                    "64 is nanoseek's train.micro_batch default")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--engines", nargs="+", default=["nanoseek", "trl"])
    ap.add_argument("--profile-update", action="store_true", help="nanoseek: profile the first timed step's policy "
                    "update (its kernels and their time, in the record's update_profile)")
    ap.add_argument("--automatic-gc", action="store_true", help="nanoseek: leave Python's garbage collector "
                    "automatic inside the loop (what nanoseek.run.steps_with_gc buys)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra nanoseek recipe override, e.g. sampling.decode=compiled (repeatable)")
    a = ap.parse_args()
    if a.quick:
        a.model, a.steps, a.warmup, a.prompts, a.group, a.new_tokens, a.micro = "tiny", 3, 1, 4, 2, 16, 4
        a.precision = "fp32"                  # TRL trains fp32 on the CPU
    if a.prompts * a.group % a.micro:
        ap.error("--micro must divide --prompts x --group (TRL accumulates whole micro-batches)")
    process_defaults()                      # as `nanoseek rl` runs (before CUDA allocates)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = header(device, model=a.model, prompts=a.prompts, group=a.group, new_tokens=a.new_tokens, micro=a.micro,
                  precision=a.precision, **({"nanoseek_set": a.set} if a.set else {}))
    medians = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(Path(tmp), QWEN_05B if a.model == "qwen0.5b" else TINY)
        for engine in a.engines:
            run = (run_nanoseek if engine == "nanoseek" else run_trl)(path, Path(tmp) / engine, a)
            if run is None:
                emit({**base, "engine": engine, "skipped": "trl is not installed"})
                continue
            times, detail = run
            stats = spread(times[a.warmup:] or times)
            medians[engine] = stats["median_s"]
            emit({**base, "engine": engine, **stats, "all_steps_s": [round(t, 3) for t in times], **detail})
    if len(medians) == 2:
        emit({**base, "speedup": round(medians["trl"] / medians["nanoseek"], 2)})


if __name__ == "__main__":
    main()
