"""The rollout engine against the plainest reference: one full forward per row, no cache, no padding."""

import numpy as np
import pytest
import torch

from nanoseek.config import DenseConfig, ModelConfig
from nanoseek.errors import UserError
from nanoseek.model import build_model
from nanoseek.model.chunked_ce import token_logprobs
from nanoseek.sampling.rollout import SamplingConfig, filtered_probs, generate, left_pad

PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12], [13, 14], [15, 16, 17, 18, 19], [20, 21, 22, 23]]


def make_model(kind):
    torch.manual_seed(0)
    cfg = (ModelConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, intermediate_size=128)
           if kind == "deepseek" else
           DenseConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2))
    model = build_model(cfg).eval()
    with torch.no_grad():                       # sharper logits than the 0.02 init, so greedy is not a tie-fest
        model.lm_head.weight.mul_(40)
    return model


def reference_logprobs(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids[:, :-1]).logits
    return token_logprobs(logits, ids[:, 1:])[0, len(prompt) - 1:]


@pytest.mark.parametrize("kind,decode", [("deepseek", "dynamic"), ("dense", "dynamic"), ("deepseek", "static")])
def test_sampled_logprobs_match_full_forward(kind, decode):
    model = make_model(kind)
    stop = list(range(88, 96))                  # 1/12 of the vocabulary: rows stop at different steps
    cfg = SamplingConfig(max_new_tokens=14, temperature=0.8, top_k=40, stop=[], compact_at=0.3, decode=decode)
    g = generate(model, PROMPTS, cfg, stop, pad_id=0, generator=torch.Generator().manual_seed(4))
    comps = g.completions()
    assert {"stop", "length"} <= set(g.finish)   # both endings occur, and compaction happened in between
    for prompt, comp, lp, tok, n, fin in zip(PROMPTS, comps, g.logprobs, g.tokens, g.lengths.tolist(), g.finish):
        assert len(comp) == n and not any(t in stop for t in comp[:-1])
        assert (comp[-1] in stop) == (fin == "stop") and (fin == "stop" or n == 14)
        torch.testing.assert_close(lp[:n], reference_logprobs(model, prompt, comp), atol=2e-4, rtol=1e-4)
        assert torch.all(lp[n:] == 0) and torch.all(tok[n:] == 0)


def naive_greedy(model, prompt, n, stop):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt in stop:
                break
    return ids[len(prompt):]


@pytest.mark.parametrize("kind", ["deepseek", "dense"])
def test_greedy_matches_naive_loop_in_every_decode_mode(kind):
    model = make_model(kind)
    stop = list(range(70, 96))
    want = [naive_greedy(model, p, 8, stop) for p in PROMPTS]
    assert len({len(w) for w in want}) > 1
    # drop a row as soon as it stops / never drop / fixed-shape steps over the whole cache (the CUDA-graph step)
    for decode, compact_at in (("dynamic", 0.01), ("dynamic", 2.0), ("static", 0.5)):
        cfg = SamplingConfig(max_new_tokens=8, greedy=True, stop=[], compact_at=compact_at, decode=decode)
        assert generate(model, PROMPTS, cfg, stop, pad_id=0).completions() == want, decode


def test_compaction_shrinks_the_batch():
    model = make_model("dense")
    widths = []
    model.register_forward_pre_hook(lambda m, args: widths.append(args[0].shape[0]))
    g = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12, greedy=True, stop=[], compact_at=0.01),
                 list(range(70, 96)), pad_id=0)
    n_live = [sum(int(n) > t for n in g.lengths) for t in range(12)]
    # the forward that feeds token t runs on the rows still unfinished after it
    assert widths[0] == len(PROMPTS) and widths[1:] == [w for w in n_live[1:] if w][:len(widths) - 1]
    assert min(widths) < len(PROMPTS)


def filtered_reference(logits, temperature, top_k, top_p):
    z = logits.astype(np.float64) / temperature
    out = np.zeros_like(z)
    for b in range(z.shape[0]):
        order = sorted(range(z.shape[1]), key=lambda i: -z[b, i])
        keep = order[:top_k] if top_k else order
        p = np.exp(z[b, keep] - z[b, keep].max())
        p /= p.sum()
        mass, chosen = 0.0, []
        for i, pi in zip(keep, p):
            if mass >= top_p:
                break
            chosen.append(i)
            mass += pi
        q = np.exp(z[b, chosen] - z[b, chosen].max())
        out[b, chosen] = q / q.sum()
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 0, 0.95), (1.3, 5, 1.0), (0.7, 8, 0.5)])
def test_filtered_probs_match_reference(temperature, top_k, top_p):
    logits = torch.randn(4, 17, generator=torch.Generator().manual_seed(1)) * 2
    got = filtered_probs(logits, temperature, top_k, top_p)
    np.testing.assert_allclose(got.numpy(), filtered_reference(logits.numpy(), temperature, top_k, top_p), atol=1e-6)


def test_sampling_frequencies_follow_the_filtered_distribution():
    """Empirical frequencies of 20k draws through the engine's sampler vs the filtered distribution."""
    from nanoseek.sampling.rollout import _next_tokens

    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]]).repeat(20000, 1)
    cfg = SamplingConfig(temperature=0.9, top_p=0.9, top_k=4, stop=[])
    tok, logp = _next_tokens(logits, cfg, torch.Generator().manual_seed(0))
    freq = np.bincount(tok.numpy(), minlength=6) / 20000
    want = filtered_reference(logits[:1].numpy(), 0.9, 4, 0.9)[0]
    assert np.all(freq[want == 0] == 0)
    np.testing.assert_allclose(freq, want, atol=0.015)
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1).gather(-1, tok[:, None])[:, 0])


def test_left_pad_and_bad_input():
    ids, mask = left_pad([[5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[5, 6], [0, 7]] and mask.tolist() == [[1, 1], [0, 1]]
    model = make_model("dense")
    with pytest.raises(UserError, match="max_position_embeddings"):
        generate(model, [[1] * 500], SamplingConfig(max_new_tokens=100), [0])
    with pytest.raises(UserError, match="temperature"):
        SamplingConfig(temperature=0)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="CUDA"):
            generate(model, [[1]], SamplingConfig(decode="graph"), [0])
    with pytest.raises(UserError, match="at least one token"):
        generate(model, [[]], SamplingConfig(), [0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["deepseek", "dense"])
def test_cuda_graph_replays_the_static_step_exactly(kind):
    """The graph replays the static step's kernels: same tokens and log-probs, bit for bit (the static step
    itself is checked against the dynamic one and the naive loop on CPU above)."""
    model = make_model(kind).cuda().to(torch.bfloat16)
    outs = []
    for decode in ("static", "graph"):
        g = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12, temperature=1.0, stop=[], decode=decode),
                     [95], generator=torch.Generator("cuda").manual_seed(0))
        outs.append((g.tokens, g.logprobs))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


def test_chat_printer_shows_reasoning_dim_and_streams_whole_characters():
    import io

    from rich.console import Console

    from nanoseek.commands.rl import ThinkingPrinter

    pieces = {1: "<think>", 2: "add 2", 3: "</think>", 4: "<answer>4", 5: "</answer>", 6: "\xe2", 7: "\x82\xac"}

    class Tok:          # decode as bytes (latin-1 pieces), so "€" arrives in two tokens like byte-level BPE
        @staticmethod
        def decode(ids, skip_special_tokens=False):
            return "".join(pieces[i] for i in ids).encode("latin-1").decode("utf-8", errors="replace")

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, color_system="standard", width=200)
    printer = ThinkingPrinter(console, Tok(), thinking=False)
    for t in (1, 2, 3, 4, 6, 7, 5):
        printer(0, t)
    out = buf.getvalue()
    plain = __import__("re").sub(r"\x1b\[[0-9;]*m", "", out)
    assert plain == "<think>add 2</think><answer>4€</answer>"          # the split euro sign comes out whole
    dim, bold = "\x1b[2;3m", "\x1b[1m"                                 # rich's dim italic / bold
    assert out.index(dim) < out.index("add 2") < out.index(bold) < out.index("<answer>")


def test_generate_command_prints_one_json_line_per_sample(tmp_path, capsys):
    import json

    from conftest import make_base

    from nanoseek.cli import main

    base = make_base(tmp_path)
    assert main(["generate", "--checkpoint", str(base), "--prompt", "What is 1 + 2?", "--prompt", "hi",
                 "--samples", "2", "--max-new-tokens", "5", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["prompt"] for x in lines] == ["What is 1 + 2?"] * 2 + ["hi"] * 2
    assert all(1 <= x["tokens"] <= 5 and x["finish"] in ("stop", "length") for x in lines)
    assert main(["generate", "--checkpoint", str(base), "--prompt", "x", "--max-new-tokens", "0"]) == 2


# ---------------------------------------------------------------- the static engine (issue 18)

SHARED = [PROMPTS[1]] * 3 + [PROMPTS[0], PROMPTS[3]] + [PROMPTS[4]] * 2 + [PROMPTS[2], PROMPTS[5]]


@pytest.mark.parametrize("kind", ["deepseek", "dense"])
@pytest.mark.parametrize("n", [5, 11])
def test_continuous_batching_and_shared_prefill_match_the_naive_loop(kind, n):
    """Greedy tokens of every engine layout equal one uncached full forward per token: rows that finish
    hand their cache row to a waiting prompt (max_batch < prompts), repeated prompts are prefilled once."""
    model = make_model(kind)
    stop = list(range(70, 96))
    want = [naive_greedy(model, p, n, stop) for p in SHARED]
    assert len({len(w) for w in want}) > 1
    for decode, max_batch in (("dynamic", 0), ("static", 0), ("static", 2), ("static", 3)):
        cfg = SamplingConfig(max_new_tokens=n, greedy=True, stop=[], decode=decode, max_batch=max_batch)
        g = generate(model, SHARED, cfg, stop, pad_id=0)
        assert g.completions() == want, (decode, max_batch)
        assert g.finish == ["stop" if w[-1] in stop else "length" for w in want]


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_shared_prompt_is_prefilled_once(decode):
    model = make_model("deepseek")
    widths = []
    model.register_forward_pre_hook(lambda m, args: widths.append(tuple(args[0].shape)))
    generate(model, SHARED, SamplingConfig(max_new_tokens=3, greedy=True, stop=[], decode=decode), [95])
    distinct = len({tuple(p) for p in SHARED})
    assert widths[0] == (distinct, max(len(p) for p in SHARED))     # the prefill: one row per distinct prompt
    assert all(w[1] == 1 for w in widths[1:])                        # then single-token steps


@pytest.mark.parametrize("kind,max_batch", [("deepseek", 2), ("dense", 3)])
def test_static_engine_logprobs_match_full_forward(kind, max_batch):
    """Sampled tokens' log-probs (temperature, top-k, top-p in play; continuous batching) equal log π of an
    uncached fp32 forward of prompt + completion."""
    model = make_model(kind)
    stop = list(range(88, 96))
    cfg = SamplingConfig(max_new_tokens=14, temperature=0.8, top_k=40, top_p=0.9, stop=[], decode="static",
                         max_batch=max_batch)
    g = generate(model, SHARED, cfg, stop, pad_id=0, generator=torch.Generator().manual_seed(4))
    assert {"stop", "length"} <= set(g.finish)
    for prompt, comp, lp, tok, n in zip(SHARED, g.completions(), g.logprobs, g.tokens, g.lengths.tolist()):
        assert len(comp) == n and not any(t in stop for t in comp[:-1])
        torch.testing.assert_close(lp[:n], reference_logprobs(model, prompt, comp), atol=2e-4, rtol=1e-4)
        assert torch.all(lp[n:] == 0) and torch.all(tok[n:] == 0)


def test_compiled_decoding_matches_static_and_writes_the_cache_in_place():
    """decode="compiled" (on the CPU: the static step through torch.compile, no graph) gives the static
    engine's greedy tokens, and sampled log-probs equal to an uncached forward. No kernel of the compiled
    step touches as many elements as a whole cache tensor: a slice write into the cache used to be
    functionalised into a full copy per layer (the inductor code is searched for the cache's numel). Dense
    only: on the CPU the MoE's expert loop reads its counts on the host, a recompile per step (the MLA cache
    compiled is covered on CUDA by test_cuda_engine_logprobs_match_a_bf16_full_forward)."""
    from dataclasses import replace

    from torch._inductor.utils import run_and_get_code

    from nanoseek.sampling import rollout

    torch._dynamo.reset()
    model = make_model("dense")
    cfg = SamplingConfig(max_new_tokens=6, greedy=True, stop=[], decode="static")
    want = generate(model, PROMPTS, cfg, [90])
    got, code = run_and_get_code(generate, model, PROMPTS, replace(cfg, decode="compiled"), [90])
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.lengths, want.lengths)
    dec = next(reversed(rollout._DECODERS[model].values()))
    assert dec.use_graph is False and code
    numel = dec.cache.tensors[0].numel()
    assert not any(f"{numel}L" in c for c in code), f"a kernel of the compiled step spans the whole cache ({numel})"
    sampled = generate(model, PROMPTS, replace(cfg, greedy=False, temperature=0.9, decode="compiled"), [90],
                       generator=torch.Generator().manual_seed(3))
    for prompt, comp, lp, n in zip(PROMPTS, sampled.completions(), sampled.logprobs, sampled.lengths.tolist()):
        torch.testing.assert_close(lp[:n], reference_logprobs(model, prompt, comp), atol=2e-4, rtol=1e-4)
    torch._dynamo.reset()


def test_decoder_is_reused_across_calls_and_reset():
    """The second call with the same shapes runs on the first call's decoder (on CUDA: its captured graph),
    and gives what a fresh decoder gives."""
    from nanoseek.sampling import rollout

    model = make_model("dense")
    cfg = SamplingConfig(max_new_tokens=6, temperature=1.0, stop=[], decode="static")
    first = generate(model, PROMPTS[::-1], cfg, [90], generator=torch.Generator().manual_seed(1))
    (dec,) = rollout._DECODERS[model].values()
    again = generate(model, PROMPTS, cfg, [90], generator=torch.Generator().manual_seed(2))
    assert list(rollout._DECODERS[model].values()) == [dec]
    rollout._DECODERS.pop(model)
    fresh = generate(model, PROMPTS, cfg, [90], generator=torch.Generator().manual_seed(2))
    assert rollout._DECODERS[model] and next(iter(rollout._DECODERS[model].values())) is not dec
    assert torch.equal(again.tokens, fresh.tokens) and torch.equal(again.logprobs, fresh.logprobs)
    assert not torch.equal(first.tokens, fresh.tokens)
    # a decoder with up to 1.5x the slots and 2x the rows a call needs serves it: 100 + 60 tokens fill 192
    # slots of 8 rows; 8 + 60 tokens ask for 128, 3 prompts for 4 rows; one decoder for all, and its tokens are
    # those of fresh exact-size ones
    rollout._DECODERS.pop(model)
    cfg = SamplingConfig(max_new_tokens=60, greedy=True, stop=[], decode="static")
    generate(model, [[3] * 100] + PROMPTS[1:], cfg, [90])
    (big,) = rollout._DECODERS[model].values()
    short = generate(model, PROMPTS, cfg, [90])
    fewer = generate(model, PROMPTS[:3], cfg, [90])
    assert list(rollout._DECODERS[model].values()) == [big] and (big.B, big.S) == (8, 192)
    for prompts, got, shape in ((PROMPTS, short, (8, 128)), (PROMPTS[:3], fewer, (4, 128))):
        rollout._DECODERS.pop(model)
        exact = generate(model, prompts, cfg, [90])
        dec = next(iter(rollout._DECODERS[model].values()))
        assert (dec.B, dec.S) == shape and torch.equal(got.tokens, exact.tokens)


def test_max_batch_must_not_be_negative():
    with pytest.raises(UserError, match="max_batch"):
        SamplingConfig(max_batch=-1)


def test_tis_weights_and_gap_follow_their_formulas():
    from nanoseek.rl.tis import logprob_gap, tis_weights

    train = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.1, -4.0]], requires_grad=True)
    sample = torch.tensor([[-1.5, -1.0, -0.5], [-1.0, -0.2, -9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    w = tis_weights(train, sample, cap=2.0)
    want = np.minimum(np.exp(train.detach().double().numpy() - sample.double().numpy()), 2.0)
    np.testing.assert_allclose(w.numpy(), want, rtol=1e-6)
    assert not w.requires_grad
    gap = (0.5 + 1.0 + 2.0 + 0.1 + 5.0) / 5
    assert abs(float(logprob_gap(train.detach(), sample, mask)) - gap) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", ["deepseek", "dense"])
@pytest.mark.parametrize("decode", ["graph", "compiled"])
def test_cuda_engine_logprobs_match_a_bf16_full_forward(kind, decode):
    """bf16 on the GPU, CUDA graph (and torch.compile) with continuous batching: log-probs of the sampled
    tokens agree with an uncached bf16 forward to bf16 rounding."""
    model = make_model(kind).cuda().to(torch.bfloat16)
    cfg = SamplingConfig(max_new_tokens=16, temperature=1.0, stop=[], decode=decode, max_batch=4)
    g = generate(model, SHARED, cfg, [95], generator=torch.Generator("cuda").manual_seed(0))
    gaps = []
    for prompt, comp, lp, n in zip(SHARED, g.completions(), g.logprobs, g.lengths.tolist()):
        ids = torch.tensor([prompt + comp], device="cuda")
        with torch.no_grad():
            ref = token_logprobs(model(ids[:, :-1]).logits.float(), ids[:, 1:])[0, len(prompt) - 1:]
        gaps.append((lp[:n] - ref).abs())
    gaps = torch.cat(gaps)
    print(decode, kind, "mean", float(gaps.mean()), "max", float(gaps.max()))
    assert float(gaps.mean()) < 0.05 and float(gaps.max()) < 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decoding_reads_the_host_once_per_check():
    """No host synchronisation per token: the syncs (CUDA's sync debug mode warns on each) grow by one per
    `check_every` decode steps, not one per token; prefill and row admission add a fixed few, the same for
    any length, so they cancel in the difference between a 64- and a 128-token run (2026-12-03, H200: 20
    syncs for 64 tokens, against 64+ when every step read the finished flags)."""
    from nanoseek.sampling.rollout import StaticDecoder

    model = make_model("deepseek").cuda().to(torch.bfloat16)
    import warnings as w

    def syncs(new_tokens: int) -> int:
        cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=1.0, stop=[], decode="graph")
        generate(model, PROMPTS, cfg, [95], generator=torch.Generator("cuda").manual_seed(0))   # capture
        with w.catch_warnings(record=True) as caught:
            w.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                generate(model, PROMPTS, cfg, [95], generator=torch.Generator("cuda").manual_seed(0))
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(c.message) for c in caught)

    short, long = syncs(64), syncs(128)
    print("syncs", short, long)
    assert long - short <= 64 // StaticDecoder.check_every + 2
    assert short < 64                                   # far from one per token


@pytest.mark.parametrize("kind", ["deepseek", "dense"])
def test_decode_step_reads_nothing_from_the_host(kind):
    """What a CUDA graph cannot capture, checked on the CPU: one decode step (model, cache update, sampling
    with temperature / top-k / top-p, bookkeeping) makes no host read (item, nonzero) and no host-to-device
    copy (a Python scalar written by index assignment is lifted to a host tensor first)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from nanoseek.sampling import rollout

    class Record(TorchDispatchMode):
        ops: list = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    model = make_model(kind)
    cfg = SamplingConfig(max_new_tokens=4, temperature=0.7, top_k=20, top_p=0.9, stop=[], decode="static")
    generate(model, PROMPTS, cfg, [95], generator=torch.Generator().manual_seed(0))
    dec = next(iter(rollout._DECODERS[model].values()))
    with torch.no_grad(), Record() as rec:
        dec._step()
    assert len(rec.ops) > 100
    bad = [op for op in rec.ops if any(k in op for k in ("lift_fresh", "_local_scalar_dense", "nonzero", "tolist"))]
    assert not bad


def test_decoders_do_not_keep_their_model_alive():
    import gc
    import weakref

    from nanoseek.sampling import rollout

    model = make_model("dense")
    generate(model, PROMPTS, SamplingConfig(max_new_tokens=3, greedy=True, stop=[], decode="static"), [95])
    assert len(rollout._DECODERS[model]) == 1
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("decode", ["graph", "compiled"])
def test_cuda_graph_reused_across_calls_sees_updated_fp32_masters_under_autocast(decode):
    """The GRPO trainer's setting: fp32 master weights, bf16 autocast, an optimizer step between rollouts.
    The second call replays the first call's graph; it must decode with the updated weights (a graph captured
    from autocast's weight-cast cache would read the first call's freed bf16 copies instead)."""
    from nanoseek.sampling import rollout

    torch._dynamo.reset()
    model = make_model("deepseek").cuda()
    cfg = SamplingConfig(max_new_tokens=10, greedy=True, stop=[], decode=decode)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        generate(model, PROMPTS, cfg, [95])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        replayed = generate(model, PROMPTS, cfg, [95]).tokens
        rollout._DECODERS.pop(model)
        fresh = generate(model, PROMPTS, cfg, [95]).tokens
    assert torch.equal(replayed, fresh)


@pytest.mark.parametrize("max_batch", [0, 2])
def test_static_engine_streams_each_rows_tokens_in_order(max_batch):
    """on_token (`nanoseek chat`) reports every generated token of every row exactly once, in order, also when
    rows are admitted mid-way (continuous batching)."""
    from collections import defaultdict

    model = make_model("deepseek")
    seen = defaultdict(list)
    cfg = SamplingConfig(max_new_tokens=9, temperature=1.0, stop=[], decode="static", max_batch=max_batch)
    g = generate(model, PROMPTS, cfg, list(range(85, 96)), generator=torch.Generator().manual_seed(3),
                 on_token=lambda r, t: seen[r].append(t))
    assert [seen[i] for i in range(len(PROMPTS))] == g.completions()
    assert len(set(g.lengths.tolist())) > 1


# ---------------------------------------------------------------- multi-token stop strings (issue 20)

def _letters(ids):
    """A toy decode: each id is one letter of seven, so a stop string spans several tokens and many ids spell it."""
    return "".join("abcdefg"[i % 7] for i in ids)


@pytest.mark.parametrize("decode,max_batch", [("dynamic", 0), ("static", 0), ("static", 2)])
def test_multi_token_stop_string_cuts_the_uncut_decode_after_the_string(decode, max_batch):
    """Greedy decoding with a stop string the tokenizer spells with several tokens gives exactly the tokens
    (and log-probs) of the uncut decode up to and including the token that completes the string, finish
    "stop"; rows that never spell it run to max_new_tokens. The static engine finds the strings at its
    checks (every 16 steps), so 20 tokens cover a cut before and after a check."""
    from nanoseek.sampling.rollout import Stops

    model = make_model("dense")
    n = 20
    cfg = SamplingConfig(max_new_tokens=n, greedy=True, stop=[], decode=decode, max_batch=max_batch)
    uncut = generate(model, SHARED, cfg, [], pad_id=0)
    rows = uncut.completions()
    assert all(len(r) == n for r in rows)
    strings = ("bd", "efd")

    def want_len(r):        # the independent reference: the shortest prefix whose text holds a string
        return next((k for k in range(1, n + 1) if any(s in _letters(r[:k]) for s in strings)), None)

    lengths = [want_len(r) for r in rows]
    # rows never cut, cut before the first check, and cut after it (at the last token)
    assert None in lengths and any(k and k < 16 for k in lengths) and n in lengths
    g = generate(model, SHARED, cfg, Stops((), strings, _letters), pad_id=0)
    for i, (r, k) in enumerate(zip(rows, lengths)):
        k = k or n
        assert g.completions()[i] == r[:k]
        assert g.lengths[i] == k and g.finish[i] == ("stop" if want_len(r) else "length")
        # (the cut rows leave the batch earlier, so other rows' matmuls differ in width: rounding only)
        torch.testing.assert_close(g.logprobs[i, :k], uncut.logprobs[i, :k], atol=1e-5, rtol=1e-5)
        assert torch.all(g.logprobs[i, k:] == 0)
        assert torch.all(g.tokens[i, k:] == 0)


def test_stop_conditions_split_single_tokens_from_strings(tmp_path):
    """A stop string that is one token of the tokenizer is a device-side stop id, any other is matched on the
    text; eos ids come from the tokenizer, its generation_config.json (an int or a list) and the chat
    template's end-of-turn token."""
    import json

    from nanoseek.sampling.rollout import stop_conditions
    from nanoseek.tokenizer import Tokenizer

    tok = Tokenizer.train(["some text 123 and more words"] * 20, vocab_size=300)
    s = stop_conditions(tok, ["</answer>", "and more"])
    assert s.ids == (tok.eos_id, tok.token_id("</answer>")) and s.strings == ("and more",)
    assert s.string_end(tok.encode("x and more y"), 0) == len(tok.encode("x and more"))
    tok.save(tmp_path / "t")
    (tmp_path / "t" / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_id, 7]}))
    assert Tokenizer.load(tmp_path / "t").eos_ids == [tok.eos_id, 7]
    with pytest.raises(UserError, match="empty string"):
        stop_conditions(tok, [""])
