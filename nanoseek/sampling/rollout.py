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
  to rounding), not the log-prob under the truncated sampling distribution.

Decoding modes (`SamplingConfig.decode`):
- "dynamic": each step attends over the filled slots only and finished rows are dropped (CPU default);
- "static": every step has the same shapes, as gpt-fast does: attention runs over all S cache slots with the
  mask opening the filled ones. The model's cache contract writes the new token at slot `cache.length`, so
  we pin `length` to the last slot S-1 (a scratch "self" slot every query sees) and afterwards copy that
  slot's K/V into the row's next free slot, all with device-side indices. No shape or Python int changes
  from step to step, so
- "graph": the static step is captured once in a CUDA graph and replayed (no per-kernel launch cost, which
  is what bounds small-batch decoding of a many-layer MoE). Finished rows are not dropped in these modes;
  "auto" = "graph" on CUDA in bf16, "dynamic" elsewhere. All modes give the same tokens (tested on CPU).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from nanoseek.errors import UserError
from nanoseek.tokenizer import r1_zero_prompt


@dataclass
class SamplingConfig:
    max_new_tokens: int = 96
    temperature: float = 1.0
    top_p: float = 1.0              # nucleus: keep the smallest set of tokens whose mass reaches top_p
    top_k: int = 0                  # keep the k most likely tokens; 0 = off
    greedy: bool = False            # argmax decoding (temperature / top-p / top-k ignored)
    stop: list[str] = field(default_factory=lambda: ["</answer>"])  # stop tokens besides eos (single tokens)
    compact_at: float = 0.5         # drop finished rows once this share of the live rows has stopped
    decode: str = "auto"            # "auto" | "dynamic" | "static" | "graph" (see the module docstring)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens={self.max_new_tokens}: generate at least 1 token")
        if not self.greedy and self.temperature <= 0:
            raise UserError(f"temperature={self.temperature} must be > 0; use greedy = true for argmax decoding")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise UserError(f"top_k={self.top_k} must be >= 0 (0 = off)")
        if self.decode not in ("auto", "dynamic", "static", "graph"):
            raise UserError(f"decode={self.decode!r}; choose auto, dynamic, static or graph")


@dataclass
class Generation:
    tokens: Tensor          # [B, N] long: sampled ids, the stop token included, pad_id after the end
    logprobs: Tensor        # [B, N] fp32: log π_θ(token) at temperature 1; 0 after the end
    lengths: Tensor         # [B] long: generated tokens per row (stop token included)
    finish: list[str]       # per row: "stop" (a stop token was sampled) or "length" (max_new_tokens hit)

    def completions(self) -> list[list[int]]:
        return [self.tokens[i, :n].tolist() for i, n in enumerate(self.lengths.tolist())]


def stop_token_ids(tokenizer, stop: list[str]) -> list[int]:
    """eos plus each stop string, which must be one token of `tokenizer`."""
    ids = [tokenizer.eos_id]
    for s in stop:
        t = tokenizer.token_id(s)
        if t is None:
            raise UserError(f"stop string {s!r} is not a single token of this tokenizer; remove it from "
                            f"sampling.stop (stop strings must be tokens such as </answer>)")
        ids.append(t)
    return ids


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


def _next_tokens(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Sample from logits [B, V]; return tokens [B] and their temperature-1 log-probs [B] (fp32)."""
    logits = logits.float()
    if cfg.greedy:
        tok = logits.argmax(-1)
    else:
        probs = filtered_probs(logits, cfg.temperature, cfg.top_k, cfg.top_p)
        tok = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    logp = logits.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return tok, logp


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


def _cache_slots(cache) -> list[tuple[Tensor, int]]:
    """The cache's tensors and their slot dimension: MLA latent [L, B, S, D], dense k/v [L, B, n_kv, S, hd]."""
    if hasattr(cache, "latent"):
        return [(cache.latent, 2)]
    return [(cache.k, 3), (cache.v, 3)]


class StaticDecoder:
    """One fixed-shape decode step over a prefilled cache of S slots; optionally a CUDA graph.

    mask [B, S]: the prompt's attention mask padded with zeros, plus the scratch slot S-1 (always open).
    `slot` is the next free slot (the prompt length P at first), a device tensor like `pos` [B, 1].
    """

    def __init__(self, model, cache, prompt_mask: Tensor, pos: Tensor, graph: bool):
        self.model, self.cache = model, cache
        B, P = prompt_mask.shape
        t, dim = _cache_slots(cache)[0]
        self.S = t.shape[dim]
        self.mask = torch.zeros(B, self.S, dtype=prompt_mask.dtype, device=pos.device)
        self.mask[:, :P] = prompt_mask
        self.mask[:, -1] = 1
        self.pos = pos.clone()                                                  # [B, 1]
        self.slot = torch.full((1,), P, dtype=torch.long, device=pos.device)
        self.tok = torch.zeros(B, dtype=torch.long, device=pos.device)
        self.logits: Tensor | None = None
        self.graph, self.use_graph, self.steps = None, graph, 0

    def _step(self) -> Tensor:
        self.pos += 1
        self.cache.length = self.S - 1                                          # the model writes at slot S-1
        logits = self.model(self.tok[:, None], position_ids=self.pos, attention_mask=self.mask,
                            cache=self.cache).logits[:, -1]
        for t, dim in _cache_slots(self.cache):                                 # persist slot S-1 at `slot`
            t.index_copy_(dim, self.slot, t.narrow(dim, self.S - 1, 1))
        self.mask.index_fill_(1, self.slot, 1)
        self.slot += 1
        return logits

    def __call__(self, tok: Tensor) -> Tensor:
        self.tok.copy_(tok)
        self.steps += 1
        if not self.use_graph:
            return self._step()
        if self.graph is None and self.steps <= 2:                              # warm up on a side stream
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                logits = self._step()
            torch.cuda.current_stream().wait_stream(stream)
            return logits
        if self.graph is None:
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):                                   # recorded, not run
                    self.logits = self._step()
            except RuntimeError as e:   # e.g. a host sync inside the model (fp32 grouped_mm reads offs on the host)
                warnings.warn(f"CUDA graph capture failed ({str(e).splitlines()[0]}); decoding without graphs")
                self.use_graph = False
                return self._step()
            self.graph = graph
        self.graph.replay()
        return self.logits


def _bf16_on_cuda(model) -> bool:
    """CUDA graphs for "auto": on CUDA in bf16 (weights or autocast), where every kernel of the step,
    the MoE grouped GEMM included, runs without a host sync."""
    w = model.lm_head.weight
    return w.is_cuda and (w.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cuda")
                                                         and torch.get_autocast_dtype("cuda") == torch.bfloat16))


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: list[list[int]], cfg: SamplingConfig, stop_ids: list[int],
             pad_id: int = 0, generator: torch.Generator | None = None,
             on_token: Callable[[int, int], None] | None = None) -> Generation:
    """Sample a completion for every prompt (token-id lists), all rows in one batch.

    stop_ids: tokens that end a row (eos, `</answer>`, ...; see `stop_token_ids`). generator: for
    reproducible sampling (on the model's device). on_token(row, token_id) is called for each new token
    of each unfinished row, in order (streaming for `nanoseek chat`).
    """
    device = next(model.parameters()).device
    B, N = len(prompts), cfg.max_new_tokens
    mode = cfg.decode if cfg.decode != "auto" else ("graph" if _bf16_on_cuda(model) else "dynamic")
    if mode == "graph" and device.type != "cuda":
        raise UserError("decode=\"graph\" needs a CUDA device; use decode=\"static\" or \"auto\"")
    ids, mask = left_pad(prompts, pad_id, device)                               # [B, P]
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and ids.shape[1] + N > max_pos:
        raise UserError(f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({N}) exceeds the model's "
                        f"max_position_embeddings ({max_pos}); shorten the prompt or lower max_new_tokens")
    # under autocast the attention reads the cache in the autocast dtype anyway: store it so (same numbers,
    # half the bytes and no per-step cast of the whole cache when the weights are fp32 masters)
    amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    cache = model.new_cache(B, ids.shape[1] + N, device=device, dtype=amp)     # static: slot P+N-1 is scratch
    pos = (mask.cumsum(-1) - 1).clamp(min=0)                                    # [B, P] real-token positions
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)

    out_tok = torch.full((B, N), pad_id, dtype=torch.long, device=device)
    out_logp = torch.zeros((B, N), dtype=torch.float32, device=device)
    lengths = torch.full((B,), N, dtype=torch.long, device=device)
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    rows = torch.arange(B, device=device)       # original row of each live row
    done = torch.zeros(B, dtype=torch.bool, device=device)  # per live row

    logits = model(ids, position_ids=pos, attention_mask=mask, cache=cache).logits[:, -1]   # [B, V]
    pos = pos[:, -1:]                                                            # [B_live, 1]
    step = StaticDecoder(model, cache, mask, pos, mode == "graph") if mode != "dynamic" else None
    for t in range(N):
        tok, logp = _next_tokens(logits, cfg, generator)                        # [B_live]
        live = ~done
        out_tok[rows, t] = torch.where(live, tok, out_tok[rows, t])
        out_logp[rows, t] = torch.where(live, logp, out_logp[rows, t])
        hit = live & torch.isin(tok, stop)
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
        if step is not None:
            logits = step(tok)
            continue
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


def encode_prompt(tokenizer, question: str, template: str) -> list[int]:
    """Token ids of the prompt for `question`, bos first:
      "r1_zero": the R1-Zero template (R1 report Table 1), ending in "<think>": the completion is the reasoning;
      "chat":    the tokenizer's chat template with one user turn and the assistant header;
      "plain":   the question as is (a base model continuing text).
    """
    if template == "chat":
        return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": question}]))
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
