"""The one-pass Gumbel-max sampler (nanoseek.kernels.sampling) against its definition: tokens drawn with the
frequencies of softmax(logits / T), the temperature-1 log-prob of the drawn token, the same draw for the same
seed (however the row is split into chunks, eager or compiled), masked tokens never drawn. CUDA only."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton)")


def _chi2(tokens: torch.Tensor, p: torch.Tensor, bins: int = 20) -> float:
    """Pearson's chi-square of the draws against p over the `bins` likeliest tokens and the rest together."""
    top = p.argsort(descending=True)[:bins]
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    obs = torch.cat([counts[top], (n - counts[top].sum())[None]])
    exp = torch.cat([p[top].double(), (1 - p[top].double().sum())[None]]) * n
    return float(((obs - exp) ** 2 / exp).sum())


@pytest.mark.parametrize("rows,draws", [(8192, 1), (1, 4000)])      # one chunk per row / many chunks per row
def test_draws_follow_the_tempered_softmax_and_logprobs_are_exact(rows, draws):
    from nanoseek.kernels.sampling import gumbel_sample

    torch.manual_seed(0)
    V, T = 50_000, 0.7
    base = torch.randn(V, device="cuda") * 2
    base[:5] += 4.0                                           # a few likely tokens, a long tail
    logits = base.expand(rows, V).to(torch.bfloat16).contiguous()
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    toks, logps = [], []
    for i in range(draws):
        seed.fill_(1000 + i)
        tok, logp = gumbel_sample(logits, seed, T)
        toks.append(tok)
        logps.append(logp)
    tok, logp = torch.cat(toks), torch.cat(logps)
    ref = torch.log_softmax(logits[0].float(), -1)
    torch.testing.assert_close(logp, ref[tok], atol=1e-5, rtol=1e-5)
    p = torch.softmax(logits[0].float() / T, -1).cpu()
    assert _chi2(tok.cpu(), p) < 50.0                         # 20 dof: p-value ~2e-4


def test_same_seed_same_draw_eager_or_compiled_and_masked_tokens_never_drawn():
    from nanoseek.kernels.sampling import gumbel_sample

    torch.manual_seed(1)
    logits = torch.randn(64, 152_064, device="cuda", dtype=torch.bfloat16)
    logits[:, 1000:] = float("-inf")                          # e.g. padding of the vocabulary
    seed = torch.tensor([7], device="cuda")
    tok, logp = gumbel_sample(logits, seed, 1.0)
    assert int(tok.max()) < 1000 and bool(torch.isfinite(logp).all())
    again, _ = gumbel_sample(logits, seed, 1.0)
    compiled, _ = torch.compile(gumbel_sample, fullgraph=True)(logits, seed, 1.0)
    assert torch.equal(tok, again) and torch.equal(tok, compiled)
    seed.fill_(8)
    assert not torch.equal(tok, gumbel_sample(logits, seed, 1.0)[0])
    assert torch.equal(gumbel_sample(logits[:1], torch.tensor([7], device="cuda"), 1.0)[0], tok[:1])  # chunking
