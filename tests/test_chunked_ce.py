"""Chunked cross-entropy (train.loss_chunk): the loss and gradient of F.cross_entropy, in float64, without a
float32 [tokens, V] tensor kept for the backward."""

import pytest
import torch
import torch.nn.functional as F

from nanoseek.model.chunked_ce import chunked_cross_entropy
from nanoseek.model.deepseek import cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_matches_cross_entropy_in_float64(chunk):
    g = torch.Generator().manual_seed(chunk)
    logits = (3 * torch.randn(3, 50, 97, generator=g, dtype=torch.float64)).requires_grad_(True)   # [B, T, V]
    labels = torch.randint(0, 97, (3, 50), generator=g)
    labels[torch.rand(3, 50, generator=g) < 0.3] = -100
    reference = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    (grad_ref,) = torch.autograd.grad(reference, logits)
    loss = chunked_cross_entropy(logits, labels, chunk)
    (grad,) = torch.autograd.grad(2.5 * loss, logits)             # an upstream gradient other than 1
    assert loss.item() == pytest.approx(reference.item(), rel=1e-13)
    assert torch.allclose(grad, 2.5 * grad_ref, rtol=1e-12, atol=1e-15)
    none = torch.full_like(labels, -100)                             # no targets: 0 and no gradient, as cross_entropy
    zero = chunked_cross_entropy(logits, none, chunk)
    assert zero.item() == 0 == cross_entropy(logits, none).item()
    assert not torch.autograd.grad(zero, logits)[0].any()


def _saved_float32_elements(fn) -> int:
    """Elements of the float32 tensors autograd keeps for the backward of fn()."""
    sizes = []

    def pack(t):
        if t.dtype == torch.float32:
            sizes.append(t.numel())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(sizes)


def test_keeps_no_float32_logits_for_the_backward():
    N, V = 512, 1000
    logits = torch.randn(N, V, dtype=torch.bfloat16, requires_grad=True)     # what the lm_head gives under autocast
    labels = torch.randint(0, V, (N,))
    assert _saved_float32_elements(lambda: cross_entropy(logits, labels)) >= N * V      # the old loss: all of them
    assert _saved_float32_elements(lambda: chunked_cross_entropy(logits, labels, 64)) <= 2 * N
    a, b = cross_entropy(logits, labels), chunked_cross_entropy(logits, labels, 64)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_train_loss_chunk_switches_the_model_loss():
    from nanoseek.errors import UserError
    from nanoseek.train.trainer import TrainConfig, forward_backward, prepare_model
    from test_train import micro_model, rows

    x, y = rows(n=4, t=12, mask=True)
    cpu = torch.device("cpu")
    runs = []
    for loss_chunk in (0, 5):
        model = prepare_model(micro_model(torch.float32), TrainConfig(loss_chunk=loss_chunk), cpu)
        assert (getattr(model.loss_fn, "func", None) is chunked_cross_entropy) == bool(loss_chunk)
        losses = forward_backward(model, [(x, y)], TrainConfig(), cpu)
        runs.append((losses, [p.grad for p in model.parameters()]))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-5)              # CE, MTP and balance losses
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(runs[0][1], runs[1][1]))
    with pytest.raises(UserError, match="loss_chunk"):
        TrainConfig(loss_chunk=-1)


@pytest.mark.parametrize("chunk", [1, 5, 40, 10_000])
def test_token_logprobs_and_entropy_match_float64_on_a_sliced_view(chunk):
    """The RL update's log-probs and entropy: values and gradient of the float64 log-softmax, on the response
    columns of a [B, T, V] tensor (a strided view, chunked over B without a copy), for any chunk size."""
    from nanoseek.model.chunked_ce import token_entropy, token_logprobs

    g = torch.Generator().manual_seed(chunk)
    full = (4 * torch.randn(3, 12, 97, generator=g, dtype=torch.float64)).requires_grad_(True)
    logits = full[:, 4:11]                                             # [3, 7, 97], not contiguous
    tokens = torch.randint(0, 97, (3, 7), generator=g)
    upstream = torch.randn(3, 7, generator=g, dtype=torch.float64)
    ref = F.log_softmax(logits, dim=-1).gather(-1, tokens[..., None]).squeeze(-1)
    (grad_ref,) = torch.autograd.grad((ref * upstream).sum(), full)
    logp = token_logprobs(logits, tokens, chunk)
    (grad,) = torch.autograd.grad((logp * upstream).sum(), full)
    assert logp.dtype == torch.float64 and torch.allclose(logp, ref, rtol=1e-12, atol=1e-13)
    assert torch.allclose(grad, grad_ref, rtol=1e-11, atol=1e-13) and not grad[:, :4].any()
    p = F.softmax(logits.detach(), dim=-1)
    assert torch.allclose(token_entropy(logits, chunk), -(p * p.log()).sum(-1), rtol=1e-12, atol=1e-13)
    bf16 = logits.detach().bfloat16()                                  # float32 results from bf16 logits
    assert token_logprobs(bf16, tokens, chunk).dtype == token_entropy(bf16, chunk).dtype == torch.float32


def test_token_logprobs_keep_no_float32_logits_for_the_backward():
    from nanoseek.model.chunked_ce import token_logprobs

    B, T, V = 8, 64, 1000
    logits = torch.randn(B, T, V, dtype=torch.bfloat16, requires_grad=True)
    tokens = torch.randint(0, V, (B, T))
    whole = lambda: logits.float().gather(-1, tokens[..., None]).squeeze(-1) - logits.float().logsumexp(-1)  # noqa: E731
    assert _saved_float32_elements(whole) >= B * T * V                 # the unchunked form: all of them
    assert _saved_float32_elements(lambda: token_logprobs(logits, tokens, 64)) <= B * T


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_token_logprobs_on_cuda_bf16_match_float64_with_one_chunk_of_float32_at_a_time(compiled):
    """The RL update's path on the GPU: bf16 logits of a Qwen-sized vocabulary, log-probs and gradient against the
    float64 log-softmax of the same bf16 values, and peak extra memory of about one float32 chunk, not [B, T, V]."""
    from nanoseek.model.chunked_ce import token_entropy, token_logprobs

    B, T, V, chunk = 8, 96, 151_936, 256
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (3 * torch.randn(B, T, V, device="cuda", generator=g)).bfloat16().requires_grad_(True)
    tokens = torch.randint(0, V, (B, T), device="cuda", generator=g)
    upstream = torch.randn(B, T, device="cuda", generator=g)
    ref = F.log_softmax(logits.detach().double(), dim=-1)
    ref_logp = ref.gather(-1, tokens[..., None]).squeeze(-1)
    grad_ref = (ref.exp().neg_().scatter_add_(-1, tokens[..., None], torch.ones_like(ref[..., :1]))
                * upstream.double()[..., None])
    del ref
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    logp = token_logprobs(logits, tokens, chunk, compiled)
    (grad,) = torch.autograd.grad((logp * upstream).sum(), logits)
    extra = torch.cuda.max_memory_allocated() - base - grad.numel() * grad.element_size()
    assert extra < 4 * chunk * V * 4                     # a few float32 chunks at most; the whole would be 58x that
    assert torch.allclose(logp.double(), ref_logp, rtol=0, atol=1e-4)
    assert torch.allclose(grad.double(), grad_ref, rtol=2e-2, atol=1e-4)      # bf16 output of the gradient
    p = F.softmax(logits.detach()[:2].double(), dim=-1)
    assert torch.allclose(token_entropy(logits[:2], chunk, compiled).double(), -(p * p.clamp_min(1e-300).log()).sum(-1), atol=1e-3)
