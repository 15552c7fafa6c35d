"""Batched sampling with a preallocated KV cache: the rollout engine of GRPO/PPO, eval and `generate`.

RL spends most of its time generating (TRL's GRPOTrainer does; verl and OpenRLHF hand rollouts to vLLM),
so generation is its own engine rather than a loop around `model(...)`:
- prompts of different lengths are LEFT-padded into one batch, so every row's next token sits in the last
  column; `attention_mask` hides the padding and position ids count real tokens only;
- the cache is preallocated once (`model.new_cache`): the MLA latent cache with weight absorption for
  DeepSeek models, the GQA cache for dense ones; each step feeds one token per row;
- finished rows leave the batch: once `compact_at` of the live rows have stopped, the cache, mask and
  positions keep only the unfinished rows (`cache.select`), so a batch whose lengths vary a lot does not
  pay for its longest member at full width;
- the log-prob returned for each sampled token is log softmax(logits) at temperature 1, i.e. log π_θ(token)
  of the unmodified policy, whatever temperature / top-p / top-k the token was drawn with. That is the
  quantity the GRPO ratio and the KL use (the trainer recomputes it with a training forward; the two agree
  to rounding), not the log-prob under the truncated sampling distribution;
- a row ends at an eos id, a one-token stop string (both checked on the device) or a stop string this
  tokenizer spells with several tokens (matched on the host on the decoded tail, the row then cut right
  after the token that completes it), so any tokenizer runs the default stops (`Stops`, `stop_conditions`).

Decoding modes (`SamplingConfig.decode`):
- "dynamic": eager; each step attends over the filled slots only, finished rows are dropped (`compact_at`)
  and a host read per step decides it (the CPU default, where that read costs nothing);
- "static": the `StaticDecoder`: every step has the same shapes, as gpt-fast does — attention over all S
  cache slots with a per-row mask, each row with its own next free slot, position and token count, and
  sampling (temperature, top-k, top-p, inverse-CDF draw from uniforms made outside the step), stop checks and
  output bookkeeping on the device. The host reads the finished mask once every `check_every` steps; rows
  that finished then take waiting prompts (continuous batching, `max_batch`);
- "graph": the static step captured once per (model, batch bucket, slots, sampling setting) as a CUDA graph
  and replayed, also across `generate` calls; "compiled": the static step through torch.compile first
  (fewer, fused kernels), then (on CUDA) the graph. "auto" = "graph" on CUDA in bf16, "dynamic" elsewhere.
Every mode gives the greedy tokens of an uncached full forward (tests/test_rollout.py, CPU). Identical
prompts (a GRPO group's G samples) are prefilled once and their cache rows copied, in every mode. The static
modes pack the model's projections that share an input into one GEMM each (nanoseek.model.packed_linears; CUDA
weights only), decode fp32 master weights under autocast from bf16 twins refreshed once per call (the same
numbers, a quarter of the bytes per step), and a dense model's decode attention runs a split-K kernel on CUDA
(nanoseek.model.attention).
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from nanoseek.errors import UserError
from nanoseek.model import packed_linears
from nanoseek.model.cache import copy_slot
from nanoseek.tokenizer import r1_zero_prompt


@dataclass
class SamplingConfig:
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0              # nucleus: keep the smallest set of tokens whose mass reaches top_p
    top_k: int = 0                  # keep the k most likely tokens; 0 = off
    greedy: bool = False            # argmax decoding (temperature / top-p / top-k ignored)
    stop: list[str] = field(default_factory=lambda: ["</answer>"])  # stop strings besides eos (any tokenizer:
                                    # one token is checked on the device, several are matched on the decoded text)
    compact_at: float = 0.5         # drop finished rows once this share of the live rows has stopped
    decode: str = "auto"            # "auto" | "dynamic" | "static" | "graph" | "compiled" (module docstring)
    max_batch: int = 0              # static/graph: rows decoded at once; more prompts wait for a finished row's
                                    # place (continuous batching). 0 = every prompt at once

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens={self.max_new_tokens}: generate at least 1 token")
        if not self.greedy and self.temperature <= 0:
            raise UserError(f"temperature={self.temperature} must be > 0; use greedy = true for argmax decoding")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise UserError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if self.decode not in ("auto", "dynamic", "static", "graph", "compiled"):
            raise UserError(f"decode={self.decode!r}; choose auto, dynamic, static, graph or compiled")
        if self.max_batch < 0:
            raise UserError(f"max_batch={self.max_batch} must be >= 0 (0 = every prompt at once)")


@dataclass
class Generation:
    tokens: Tensor          # [B, N] long: sampled ids, the stop token (or a stop string's last one) included,
                            # pad_id after the end
    logprobs: Tensor        # [B, N] fp32: log π_θ(token) at temperature 1; 0 after the end
    lengths: Tensor         # [B] long: generated tokens per row (stop token included)
    finish: list[str]       # per row: "stop" (a stop token or string ended it) or "length" (max_new_tokens hit)

    def completions(self) -> list[list[int]]:
        return [self.tokens[i, :n].tolist() for i, n in enumerate(self.lengths.tolist())]


@dataclass(frozen=True)
class Stops:
    """What ends a row besides max_new_tokens.

    ids: tokens checked on the device at every step (the fast path): the tokenizer's end-of-sequence ids and
    the stop strings that are one token. strings: stop strings this tokenizer spells with several tokens
    ("</answer>" for a tokenizer without R1 tags); they are matched on the host on the decoded tail of each
    row (the dynamic engine every step, the static one at its `check_every` checks) and the row is cut right
    after the token that completes the string, so tokens, log-probs and lengths end there as if the
    string had been one stop token. decode(ids) -> str: the tokenizer's (special tokens kept as text).
    """
    ids: tuple[int, ...]
    strings: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = field(default=None, compare=False)

    @cached_property
    def window(self) -> int:
        # every token decodes to at least one byte, so the tokens that spell a string of b UTF-8 bytes are among
        # the last b of the row; a few more in front keep a leading partial character or space out of the match
        return max(len(s.encode("utf-8")) for s in self.strings) + 4

    def string_end(self, tokens: list[int], start: int) -> int | None:
        """The length to cut `tokens` (one row's generated ids) to: 1 + the first index >= `start` at which
        a stop string is complete in the decoded text; None when no string ends at or after `start` (the
        tokens before it were searched already)."""
        if not self.strings or len(tokens) <= start:
            return None
        w = self.window
        if not any(s in self.decode(tokens[max(0, start + 1 - w):]) for s in self.strings):
            return None
        for k in range(start, len(tokens)):                     # the first token that completes a string
            tail = self.decode(tokens[max(0, k + 1 - w):k + 1])
            if any(s in tail for s in self.strings):
                return k + 1
        return None


def stop_conditions(tokenizer, stop: list[str]) -> Stops:
    """The stops of a run: every end-of-sequence id of `tokenizer` (`Tokenizer.eos_ids`: eos, the checkpoint's
    generation_config.json eos ids, the chat template's end-of-turn token) plus each string of `stop`, as one
    token where the tokenizer has it as one, else matched on the decoded text (`Stops`)."""
    ids = list(getattr(tokenizer, "eos_ids", None) or [tokenizer.eos_id])     # (any object with an eos_id works)
    strings = []
    for s in stop:
        if not s:
            raise UserError("sampling.stop holds an empty string; remove it")
        t = tokenizer.token_id(s)
        if t is None:
            strings.append(s)
        else:
            ids.append(t)
    return Stops(tuple(dict.fromkeys(ids)), tuple(dict.fromkeys(strings)),
                 lambda ids: tokenizer.decode(ids, skip_special_tokens=False))


def filtered_probs(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """The sampling distribution [B, V] (fp32) from logits [B, V]: temperature, then top-k, then top-p.

    top-p keeps, in order of decreasing probability, every token whose preceding mass is < top_p (so the
    smallest prefix reaching top_p, and always the most likely token), then renormalises.
    """
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                 # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p                                 # mass strictly before each token
        sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


_BLOCK = 1024      # inverse_cdf's block: a scan over V / 1024 block sums, then over one block of 1024


def inverse_cdf(weights: Tensor, u: Tensor) -> Tensor:
    """Per row, the first index whose cumulative weight reaches (1 - u)·total: weights [B, V] >= 0 (any scale,
    a positive total), u [B] in [0, 1) -> [B] long. The threshold is in (0, total], so an index of zero weight
    (cut by top-k / top-p, or padding) is never picked.

    In two levels, block sums then the one block that holds the threshold, so the scans cover V/1024 + 1024
    values a row instead of V: a flat cumsum over a 152K vocabulary was the largest kernel of a decode step
    (0.25 ms of 3.4 at batch 128 on an H200). Same index as the flat scan up to float rounding."""
    B, V = weights.shape
    if V <= _BLOCK:                                                             # one block: the flat scan
        cdf = weights.cumsum(-1)
        x = (1.0 - u[:, None]) * cdf[:, -1:]
        return torch.searchsorted(cdf, x).clamp_(max=V - 1)[:, 0]
    nb = -(-V // _BLOCK)
    w = F.pad(weights, (0, nb * _BLOCK - V)).view(B, nb, _BLOCK)                 # [B, nb, blk]
    block_cdf = w.sum(-1).cumsum(-1)                                            # [B, nb]
    x = (1.0 - u[:, None]) * block_cdf[:, -1:]                                  # [B, 1] in (0, total]
    j = torch.searchsorted(block_cdf, x).clamp_(max=nb - 1)                     # [B, 1] the block holding x
    before = torch.where(j > 0, block_cdf.gather(-1, (j - 1).clamp(min=0)), 0.0)
    cdf = w.gather(1, j[:, :, None].expand(B, 1, _BLOCK))[:, 0].cumsum(-1)      # [B, blk]
    # the block's own scan may sum a hair below block_cdf: then stop at its last index of positive weight
    k = torch.searchsorted(cdf, torch.minimum(x - before, cdf[:, -1:])).clamp_(max=_BLOCK - 1)
    return (j * _BLOCK + k)[:, 0]


def sample_tokens(logits: Tensor, cfg: SamplingConfig, u: Tensor | None) -> tuple[Tensor, Tensor]:
    """Sample from logits [B, V] with uniforms u [B] (None when greedy); return tokens [B] and their
    temperature-1 log-probs [B] (fp32). Every shape is fixed and nothing is read on the host, so this runs
    inside the CUDA graph of a decode step. Inverse-CDF sampling (`inverse_cdf`) of the filtered distribution."""
    logits = logits.float()
    if cfg.greedy:
        tok = logits.argmax(-1)
    else:
        tok = inverse_cdf(filtered_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p), u)
    logp = logits.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return tok, logp


def _next_tokens(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """`sample_tokens` with fresh uniforms from `generator`."""
    u = None if cfg.greedy else torch.rand(logits.shape[0], device=logits.device, generator=generator)
    return sample_tokens(logits, cfg, u)


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    """Left-pad token lists into ids [B, P] and attention_mask [B, P] (1 = real token)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt must have at least one token")
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids.to(device), mask.to(device)


def _slot_major(t: Tensor, dim: int) -> Tensor:
    """View of a cache tensor as [L, B, S, ...] (slots third), so one advanced index [:, rows, slots] fits both."""
    return t.movedim(dim, 2)


def _prefill(model, prompts: list[list[int]], pad_id: int, cache_dtype, device, extra: int = 0) -> tuple:
    """Prefill each DISTINCT prompt once (a GRPO group's G copies share one forward); left-padded.

    Returns the cache of the U distinct rows (P + `extra` slots), their last logits [U, V], mask [U, P],
    last positions [U, 1] and `inv` [B] (request b is distinct row inv[b])."""
    first: dict[tuple, int] = {}
    inv = [first.setdefault(tuple(p), len(first)) for p in prompts]
    uniq = [list(k) for k in first]
    ids, mask = left_pad(uniq, pad_id, device)                                  # [U, P]
    cache = model.new_cache(len(uniq), ids.shape[1] + extra, device=device, dtype=cache_dtype)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)                                    # real-token positions
    logits = model(ids, position_ids=pos, attention_mask=mask, cache=cache).logits[:, -1]
    return cache, logits, mask, pos[:, -1:], torch.tensor(inv, device=device)


def _bucket(n: int) -> int:
    """Batch-size bucket of the graph cache: powers of two up to 16, then multiples of 16."""
    return 1 << (n - 1).bit_length() if n <= 16 else -(-n // 16) * 16


class StaticDecoder:
    """A fixed-shape decode engine over B cache rows of S slots each, its step optionally a CUDA graph.

    Every row is independent: its own mask [S], position, next free slot and generated-token count, so a
    finished row can take a waiting prompt (continuous batching) while the others keep decoding. One step
    (`_step`) feeds each row's last token, writes its K/V, samples the next token ON THE DEVICE with
    uniforms drawn outside the graph, records it in `hist_*` [B, N] and updates the finished mask — no
    host read; the host looks at `done` once every `check_every` steps.

    The model's cache contract writes the new token at slot `cache.length`, so we pin it to the last slot
    S-1 (a scratch slot every query sees) and afterwards copy that slot into each row's next free slot with
    device-side indices. Decoders are kept per model and shape (`_decoder`), so a graph is captured once
    and replayed across `generate` calls (the parameters are read in place: training steps between calls
    are seen).
    """

    check_every = 16

    def __init__(self, model, B: int, S: int, N: int, cache_dtype, cfg: SamplingConfig, stop_ids: list[int],
                 graph: bool, compiled: bool = False):
        # a weak reference: `_DECODERS` is keyed weakly by the model, and a strong one here would keep every
        # model that ever generated (and its decoders' caches) alive
        self._model, self.cfg, self.B, self.S, self.N = weakref.ref(model), cfg, B, S, N
        # compiled: the whole step through torch.compile (its elementwise chains and the sampler fused: a
        # decode step of `small` is ~1,500 kernels, 2.7-4 ms of GPU time on an H200 even inside a graph), then
        # captured as a graph. The cache writes are in place under compile too (nanoseek.model.cache)
        self._run = torch.compile(self._step, dynamic=False) if compiled else self._step
        if compiled:    # one compiled graph per decoder shape (B bucket, S, N, sampling setting); dynamo's default
            # of 8 per function would silently run later shapes eager (RL: rollouts, refills, evaluation)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        device = model.lm_head.weight.device
        self.cache = model.new_cache(B, S, device=device, dtype=cache_dtype)
        self.cache_dtype = cache_dtype
        self.mask = torch.zeros(B, S, dtype=torch.long, device=device)
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.slot = torch.zeros(B, dtype=torch.long, device=device)     # next free slot per row
        self.tok = torch.zeros(B, dtype=torch.long, device=device)      # last sampled token per row
        self.ngen = torch.zeros(B, dtype=torch.long, device=device)     # tokens generated per row
        self.done = torch.ones(B, dtype=torch.bool, device=device)      # finished or empty
        self.hist_tok = torch.zeros(B, N, dtype=torch.long, device=device)
        self.hist_logp = torch.zeros(B, N, dtype=torch.float32, device=device)
        self.u = torch.zeros(B, dtype=torch.float32, device=device)
        self.stop = torch.tensor(sorted(set(stop_ids)) or [-1], dtype=torch.long, device=device)
        self.rows = torch.arange(B, device=device)
        self.graph, self.use_graph, self.steps = None, graph, 0
        self.twins: dict[str, Tensor] = {}      # the weights the step reads in place of the masters (set per call)

    def _finished(self, tok: Tensor) -> Tensor:
        """Rows [B] whose new token tok [B] ends them: a stop token, or the length limit reached."""
        return (tok[:, None] == self.stop).any(-1) | (self.ngen >= self.N)

    def _step(self) -> None:
        """Feed each row's last token, keep its K/V in the row's next free slot, sample the next token and
        record it: everything on the device."""
        live = ~self.done
        self.pos += 1
        self.cache.length = self.S - 1                                          # the model writes at slot S-1
        model, args = self._model(), (self.tok[:, None],)
        kw = dict(position_ids=self.pos, attention_mask=self.mask, cache=self.cache)
        # fp32 masters under autocast: the step reads their bf16 twins (packed_linears.twins)
        out = torch.func.functional_call(model, self.twins, args, kw, tie_weights=False, strict=False) \
            if self.twins else model(*args, **kw)
        logits = out.logits[:, -1]                                              # [B, V]
        slot = self.slot.clamp(max=self.S - 2)                                  # finished rows run on harmlessly
        for t, dim in zip(self.cache.tensors, self.cache.slot_dims):             # persist slot S-1 at `slot`
            copy_slot(t, dim, self.rows, slot, self.S - 1)
        self.mask.scatter_(1, slot[:, None], 1)     # (an index_put of the scalar 1 copies it from the host)
        self.slot += 1
        tok, logp = sample_tokens(logits, self.cfg, None if self.cfg.greedy else self.u)
        col = self.ngen.clamp(max=self.N - 1)
        self.hist_tok[self.rows, col] = torch.where(live, tok, self.hist_tok[self.rows, col])
        self.hist_logp[self.rows, col] = torch.where(live, logp, self.hist_logp[self.rows, col])
        self.ngen += live
        self.done |= live & self._finished(tok)
        self.tok.copy_(tok)

    def step(self, generator: torch.Generator | None) -> None:
        if not self.cfg.greedy:                                                 # the step's randomness, drawn
            torch.rand(self.B, generator=generator, out=self.u)                 # outside the graph
        self.steps += 1
        if not self.use_graph:
            return self._run()
        if self.graph is None and self.steps <= 2:                              # warm up on a side stream
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), _no_cast_cache():
                self._run()
            torch.cuda.current_stream().wait_stream(stream)
            return
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph), _no_cast_cache():                 # recorded, not run
                    self._run()
            except RuntimeError as e:   # e.g. a host sync inside the model (fp32 grouped_mm reads offs on the host)
                warnings.warn(f"CUDA graph capture failed ({str(e).splitlines()[0]}); decoding without graphs")
                self.use_graph = False
                return self._run()
            self.graph = graph
        self.graph.replay()

    def admit(self, rows: list[int], prompts: list[list[int]], pad_id: int, generator) -> None:
        """Start `prompts` in cache rows `rows`: prefill (once per distinct prompt), copy the prompt's cache
        into the rows' slots [0, P), sample each row's first token from the prefill logits."""
        tmp, logits, pmask, last, inv = _prefill(self._model(), prompts, pad_id, self.cache_dtype,
                                                 self.mask.device)
        P = pmask.shape[1]
        r = torch.tensor(rows, device=self.mask.device)
        for t, src, dim in zip(self.cache.tensors, tmp.tensors, self.cache.slot_dims):
            _slot_major(t, dim)[:, r, :P] = _slot_major(src, dim)[:, inv]
        self.mask[r] = 0
        self.mask[r, :P] = pmask[inv]
        self.mask[r, self.S - 1] = 1
        self.pos[r] = last[inv]
        self.slot[r] = P
        tok, logp = _next_tokens(logits[inv], self.cfg, generator)
        self.hist_tok[r] = 0
        self.hist_logp[r] = 0
        self.hist_tok[r, 0], self.hist_logp[r, 0] = tok, logp
        self.ngen[r] = 1
        self.tok[r] = tok
        self.done[r] = (tok[:, None] == self.stop).any(-1) | (self.N <= 1)


def _no_cast_cache():
    """Autocast without its weight-cast cache, for the steps a graph is captured from: a cached bf16 copy of
    an fp32 master weight would be read by every replay, though it is freed when the caller's autocast
    region ends and stale after the next optimizer step (torch's CUDA-graph notes ask for this)."""
    if torch.is_autocast_enabled("cuda"):
        return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
    return contextlib.nullcontext()


_DECODERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_KEEP_DECODERS = 2          # per model (rollouts + evaluation); each holds its cache [L, B, S, ...] on the device


def _decoder(model, B: int, S: int, N: int, cache_dtype, cfg: SamplingConfig, stop_ids: list[int],
             mode: str) -> StaticDecoder:
    """The model's decoder for this shape and sampling setting, built (and its graph captured, its step
    compiled) on first use. A kept decoder with up to 1.5x the S slots and 2x the B rows asked for serves too
    (its extra rows stay idle): prompts of an RL run vary by a few tokens and refill rounds by their number of
    groups, and a new shape would otherwise mean a new cache, capture and compilation."""
    w = model.lm_head.weight
    key = (N, cache_dtype, w.data_ptr(), w.dtype, mode, cfg.greedy, cfg.temperature, cfg.top_k, cfg.top_p,
           tuple(sorted(set(stop_ids))), torch.is_autocast_enabled(w.device.type),
           torch.get_autocast_dtype(w.device.type))
    kept = _DECODERS.setdefault(model, {})
    fits = sorted(k for k in kept if k[2:] == key and B <= k[0] <= 2 * B and S <= k[1] <= 1.5 * S)
    if fits:
        kept[fits[0]] = kept.pop(fits[0])                                       # most recently used last
        return kept[fits[0]]
    while len(kept) >= _KEEP_DECODERS:
        kept.pop(next(iter(kept)))
    kept[(B, S, *key)] = StaticDecoder(model, B, S, N, cache_dtype, cfg, stop_ids, graph=mode == "graph" or (
        mode == "compiled" and w.is_cuda), compiled=mode == "compiled")
    return kept[(B, S, *key)]


def _bf16_on_cuda(model) -> bool:
    """CUDA graphs for "auto": on CUDA in bf16 (weights or autocast), where every kernel of the step,
    the MoE grouped GEMM included, runs without a host sync."""
    w = model.lm_head.weight
    return w.is_cuda and (w.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cuda")
                                                         and torch.get_autocast_dtype("cuda") == torch.bfloat16))


def _generate_static(model, prompts, cfg: SamplingConfig, stops: Stops, pad_id, generator, on_token,
                     mode: str, cache_dtype, device, twins: dict[str, Tensor]) -> Generation:
    """The static engine: up to `cfg.max_batch` rows decode at once; a finished row takes the next waiting
    prompt at the next check (every `check_every` steps, the only host reads). Multi-token stop strings are
    matched at the checks on the rows' new tokens (`_cut_at_strings`)."""
    R, N = len(prompts), cfg.max_new_tokens
    width = min(R, cfg.max_batch) if cfg.max_batch else R
    P = max(len(p) for p in prompts)
    S = -(-(P + N) // 64) * 64                                                  # slot bucket; S-1 is scratch
    dec = _decoder(model, _bucket(width), S, N, cache_dtype, cfg, list(stops.ids), mode)
    dec.twins = twins
    out_tok = torch.full((R, N), pad_id, dtype=torch.long, device=device)
    out_logp = torch.zeros((R, N), dtype=torch.float32, device=device)
    lengths = torch.zeros(R, dtype=torch.long, device=device)
    dec.done.fill_(True)
    owner = [-1] * dec.B                        # request held by each cache row (-1 = free)
    left = [0] * dec.B                          # upper bound on each row's remaining steps
    searched = [0] * dec.B                      # tokens of each row already searched for stop strings
    string_stop = torch.zeros(R, dtype=torch.bool)   # requests cut at a stop string
    waiting = iter(range(R))
    check = 1 if on_token is not None else dec.check_every
    while True:
        free = [b for b in range(width) if owner[b] < 0]        # a reused wider decoder: its first `width` rows
        take = list(zip(free, waiting))
        if take:
            dec.admit([b for b, _ in take], [prompts[r] for _, r in take], pad_id, generator)
            for b, r in take:
                owner[b], left[b], searched[b] = r, N - 1, 0
                if on_token is not None:
                    on_token(r, int(dec.hist_tok[b, 0]))
        busy = [b for b in range(dec.B) if owner[b] >= 0]
        if not busy:
            break
        n = min(check, max(left[b] for b in busy))
        for _ in range(n):
            was_done = dec.done.tolist() if on_token is not None else None
            dec.step(generator)
            if on_token is not None:                                            # streaming: a read per step
                toks = dec.tok.tolist()
                for b in busy:
                    if not was_done[b]:
                        on_token(owner[b], toks[b])
        left = [max(0, x - n) for x in left]
        done = dec.done.tolist()                                                # the check: one host read
        if stops.strings:
            for b in _cut_at_strings(dec, busy, searched, stops):
                done[b] = True
                string_stop[owner[b]] = True
        fin = [b for b in busy if done[b] or left[b] <= 0]
        if fin:
            rows = torch.tensor(fin, device=device)
            reqs = torch.tensor([owner[b] for b in fin], device=device)
            out_tok[reqs] = _masked_hist(dec, rows, pad_id)
            out_logp[reqs] = _masked_hist(dec, rows, 0.0, logp=True)
            lengths[reqs] = dec.ngen[rows]
            for b in fin:
                owner[b] = -1
    last = out_tok.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    stopped = (torch.isin(last, dec.stop) & (lengths > 0)).cpu() | string_stop
    return Generation(out_tok, out_logp, lengths, ["stop" if s else "length" for s in stopped.tolist()])


def _cut_at_strings(dec: StaticDecoder, busy: list[int], searched: list[int], stops: Stops) -> list[int]:
    """At a check: search the tokens each busy row generated since the last check for a stop string; a row
    where one ends is cut right after its last token (its count `ngen` set there, so the output and the
    log-probs end there) and marked done. Returns those rows. One more host read (the rows' histories)."""
    # only the columns a search can read: from the window before the earliest unsearched token
    lo = max(0, min(searched[b] for b in busy) + 1 - stops.window)
    state = torch.cat([dec.ngen[:, None], dec.hist_tok[:, lo:]], 1)[busy].tolist()   # [len(busy), 1 + N - lo]
    cut = {}
    for b, (n, *tail) in zip(busy, state):
        end = stops.string_end(tail[:n - lo], searched[b] - lo)
        searched[b] = n
        if end is not None:
            cut[b] = lo + end
    if cut:
        rows = torch.tensor(list(cut), device=dec.ngen.device)
        dec.ngen[rows] = torch.tensor(list(cut.values()), device=dec.ngen.device)
        dec.done[rows] = True
    return list(cut)


def _masked_hist(dec: StaticDecoder, rows: Tensor, fill, logp: bool = False) -> Tensor:
    """The history of cache rows `rows` [k] with entries past each row's length set to `fill`: [k, N]."""
    hist = (dec.hist_logp if logp else dec.hist_tok)[rows]
    cols = torch.arange(dec.N, device=rows.device)
    return hist.masked_fill(cols >= dec.ngen[rows, None], fill)


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: list[list[int]], cfg: SamplingConfig, stops: Stops | list[int],
             pad_id: int = 0, generator: torch.Generator | None = None,
             on_token: Callable[[int, int], None] | None = None) -> Generation:
    """Sample a completion for every prompt (token-id lists).

    stops: what ends a row (`stop_conditions(tokenizer, cfg.stop)`), or a list of stop token ids. generator: for
    reproducible sampling (on the model's device). on_token(row, token_id) is called for each new token
    of each unfinished row, in order (streaming for `nanoseek chat`). Identical prompts (a GRPO group's G
    samples) are prefilled once and their cache rows copied.
    """
    device = next(model.parameters()).device
    if not isinstance(stops, Stops):
        stops = Stops(tuple(stops))
    N = cfg.max_new_tokens
    mode = cfg.decode if cfg.decode != "auto" else ("graph" if _bf16_on_cuda(model) else "dynamic")
    if mode == "graph" and device.type != "cuda":
        raise UserError("decode=\"graph\" needs a CUDA device; use decode=\"static\", \"compiled\" or \"auto\"")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("every prompt must have at least one token")
    P = max(len(p) for p in prompts)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and P + N > max_pos:
        raise UserError(f"prompt ({P} tokens) + max_new_tokens ({N}) exceeds the model's "
                        f"max_position_embeddings ({max_pos}); shorten the prompt or lower max_new_tokens")
    # under autocast the attention reads the cache in the autocast dtype anyway: store it so (same numbers,
    # half the bytes and no per-step cast of the whole cache when the weights are fp32 masters)
    amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    if mode != "dynamic":
        moved = packed_linears.pack(model)      # q|k|v and gate|up as one GEMM each (CUDA)
        twins, new = packed_linears.twins(model, amp)   # fp32 masters under autocast: bf16 copies, refreshed now
        if moved or new:                        # weights that moved leave graphs reading their old storage behind
            _DECODERS.pop(model, None)
        with packed_linears.decoding():
            return _generate_static(model, prompts, cfg, stops, pad_id, generator, on_token, mode,
                                    amp or model.lm_head.weight.dtype, device, twins)
    return _generate_dynamic(model, prompts, cfg, stops, pad_id, generator, on_token, amp, device)


def _generate_dynamic(model, prompts, cfg: SamplingConfig, stops: Stops, pad_id, generator, on_token, amp,
                      device) -> Generation:
    """Eager decoding over the filled slots, finished rows dropped (`compact_at`): the CPU engine, where a
    host read per step costs nothing and shrinking the batch saves real compute. Multi-token stop strings
    are matched every step on each live row's decoded tail, so a row ends at the token that completes one."""
    B, N = len(prompts), cfg.max_new_tokens
    cache, logits, mask, pos, inv = _prefill(model, prompts, pad_id, amp, device, extra=N)
    if logits.shape[0] < B:                                                     # copy shared prompts' rows
        cache, logits, mask, pos = cache.select(inv), logits[inv], mask[inv], pos[inv]
    stop = torch.tensor(sorted(set(stops.ids)), dtype=torch.long, device=device)
    generated: list[list[int]] = [[] for _ in range(B)]     # host copies of the rows, for stop strings

    out_tok = torch.full((B, N), pad_id, dtype=torch.long, device=device)
    out_logp = torch.zeros((B, N), dtype=torch.float32, device=device)
    lengths = torch.full((B,), N, dtype=torch.long, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)       # original row of each live row
    done = torch.zeros(B, dtype=torch.bool, device=device)  # per live row
    for t in range(N):
        tok, logp = _next_tokens(logits, cfg, generator)                        # [B_live]
        live = ~done
        out_tok[rows, t] = torch.where(live, tok, out_tok[rows, t])
        out_logp[rows, t] = torch.where(live, logp, out_logp[rows, t])
        hit = live & torch.isin(tok, stop)
        if stops.strings:
            for i, (r, k, alive) in enumerate(zip(rows.tolist(), tok.tolist(), live.tolist())):
                if alive:
                    generated[r].append(k)
                    if stops.string_end(generated[r], t) is not None:
                        hit[i] = True
        lengths[rows] = torch.where(hit, t + 1, lengths[rows])
        stopped[rows] |= hit
        done |= hit
        if on_token is not None:
            for r, k, alive in zip(rows.tolist(), tok.tolist(), live.tolist()):
                if alive:
                    on_token(r, k)
        n_done = int(done.sum())                                                # the step's one host sync
        if n_done == len(done) or t == N - 1:
            break
        if n_done and n_done >= cfg.compact_at * len(done):                     # finished rows leave the batch
            keep = (~done).nonzero().squeeze(-1)
            cache = cache.select(keep)
            rows, tok, mask, pos, done = rows[keep], tok[keep], mask[keep], pos[keep], done[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)           # [B_live, S + 1]
        pos = pos + 1
        logits = model(tok[:, None], position_ids=pos, attention_mask=mask, cache=cache).logits[:, -1]
    finish = ["stop" if s else "length" for s in stopped.tolist()]
    return Generation(out_tok, out_logp, lengths, finish)


# ---------------------------------------------------------------- prompts

TEMPLATES = ("r1_zero", "chat", "plain")


def encode_prompt(tokenizer, question: str, template: str, system: str = "") -> list[int]:
    """Token ids of the prompt for `question`, bos first:
      "r1_zero": the R1-Zero template (R1 report Table 1), ending in "<think>": the completion is the reasoning;
      "chat":    the tokenizer's chat template with one user turn and the assistant header, after a system turn
                 `system` when it is not empty (the template decides how a system turn is written);
      "plain":   the question as is (a base model continuing text).
    """
    if system and template != "chat":
        raise UserError(f"a system prompt needs the chat template, not {template!r}: set the template to \"chat\" "
                        "or leave the system prompt empty")
    if template == "chat":
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        return tokenizer.encode(tokenizer.apply_chat_template(messages))
    if template == "r1_zero":
        text = r1_zero_prompt(question)
    elif template == "plain":
        text = question
    else:
        raise UserError(f"template {template!r} is unknown; choose one of {', '.join(TEMPLATES)}")
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    return bos + tokenizer.encode(text)


def response_text(tokenizer, completion: list[int], template: str) -> str:
    """The response as the reward functions read it: the decoded completion (eos dropped, reasoning tags
    kept), with "<think>" put back in front under the R1-Zero template, whose prompt already opened it."""
    text = tokenizer.decode(completion, skip_special_tokens=True)
    return "<think>" + text if template == "r1_zero" else text
