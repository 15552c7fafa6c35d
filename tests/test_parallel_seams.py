"""The seams parallelism uses instead of copies of model code: the MoE dispatcher, pipeline stages that are
the model with parts absent, and the one training objective (checked against float64 hand computations)."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanoseek.config import ModelConfig
from nanoseek.model import build_model
from nanoseek.model.loss import target_counts, training_loss
from nanoseek.model.moe import LocalDispatch, MoE
from nanoseek.parallel.expert import EPComm, apply_expert_parallel
from nanoseek.parallel.launch import spawn
from nanoseek.parallel.mesh import init_distributed
from nanoseek.parallel.pipeline import PipelineLoss, StageModel, split_layers
from nanoseek.train.trainer import TrainConfig, forward_backward

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
                  num_attention_heads=2, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                  q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                  max_position_embeddings=64, num_nextn_predict_layers=2, first_k_dense_replace=1)
LAM, ALPHA = 0.3, 0.05


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return build_model(CFG).to(dtype)


def _micro():
    """Two micro-batches whose target counts differ (masked prompt rows, as in SFT)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, CFG.vocab_size, (4, 13), generator=g)
    x, y = ids[:, :-1], ids[:, 1:].clone()
    y[0, :9] = -100
    y[1, :4] = -100
    return [(x[:2], y[:2]), (x[2:], y[2:])]


# ---- the MoE dispatcher ------------------------------------------------------------------------

class DenseReference:
    """Σ_k w_k·E_{idx_k}(x) token by token, in float64: what any dispatcher must return."""

    def __init__(self):
        self.dtypes = []

    def __call__(self, x, idx, weights, counts, experts):
        self.dtypes.append(x.dtype)
        x64 = x.double()
        gu, down = experts.gate_up_proj.double(), experts.down_proj.double()
        out = torch.zeros_like(x64)
        for t in range(x.shape[0]):
            for k in range(idx.shape[1]):
                e = int(idx[t, k])
                gate, up = (gu[e] @ x64[t]).chunk(2)
                out[t] += float(weights[t, k].detach()) * (down[e] @ (F.silu(gate) * up))
        return out.to(x.dtype)


def test_moe_dispatcher_is_the_seam():
    torch.manual_seed(0)
    moe = MoE(CFG)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 5, CFG.hidden_size)
    assert isinstance(moe.dispatcher, LocalDispatch)
    y_local, bal_local = moe(x)
    ref = moe.dispatcher = DenseReference()
    y_ref, bal_ref = moe(x)
    torch.testing.assert_close(y_local, y_ref, rtol=1e-5, atol=1e-6)
    assert bal_local == bal_ref
    # the dispatcher gets the rows in the GEMM dtype under autocast (the cast the old EP copy had lost)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moe(x)
    assert ref.dtypes == [torch.float32, torch.bfloat16]


def _ep_worker():
    init_distributed()
    rank = dist.get_rank()
    for dedup in (True, False):
        model = _model(torch.float32)
        torch.manual_seed(10 + rank)                              # each rank routes its own tokens
        x = torch.randint(0, CFG.vocab_size, (2, 8))
        ref = model(x).logits
        apply_expert_parallel(model, EPComm(group=dist.group.WORLD, ep=2, rank=rank), dedup=dedup)
        assert model.model.layers[1].mlp.experts.gate_up_proj.shape[0] == CFG.n_routed_experts // 2
        torch.testing.assert_close(model(x).logits, ref, rtol=1e-5, atol=1e-6, msg=f"dedup={dedup}")


def test_expert_parallel_dispatchers_match_the_local_one():
    """Two ranks, each with half the experts: either EP dispatcher (dedup, per-expert) installed on the
    model's own MoE layers gives every rank the logits the whole model gives it locally."""
    spawn(_ep_worker, 2)


# ---- pipeline stages -----------------------------------------------------------------------------

def test_pipeline_stages_are_the_model_with_parts_absent():
    """Three stages cut from the model, chained by hand, give the full model's objective and gradients
    (the balance term through the stages' `_AuxLoss`), and their parameters are the model's, named alike."""
    micro = _micro()
    full = _model()
    forward_backward(full, micro, TrainConfig(mtp_lambda=LAM, balance_alpha=ALPHA), torch.device("cpu"))
    model = _model()
    ranges = split_layers(CFG.num_hidden_layers, CFG.num_nextn_predict_layers, 3)
    stages = [StageModel.cut(model, r, i == 0, i == 2) for i, r in enumerate(ranges)]
    names = [dict(s.named_parameters()) for s in stages]
    assert sum(len(n) for n in names) == len(dict(model.named_parameters()))
    for n in names:
        assert all(p is model.get_parameter(k) for k, p in n.items())
    assert stages[1].model.embed_tokens is None and stages[1].lm_head is None and len(stages[1].mtp) == 0
    loss_fn = PipelineLoss(model.loss_fn, LAM, dp=1)
    loss_fn.totals = sum(target_counts(y, CFG.num_nextn_predict_layers) for _, y in micro)
    for s in stages:
        s.balance_coef = ALPHA / len(micro)
    for x, y in micro:
        out = x
        for s in stages:
            out = s(*(out if isinstance(out, tuple) else (out,)))
        loss_fn(out, y).backward()
    want = dict(full.named_parameters())
    for n, p in model.named_parameters():
        if want[n].grad is None:
            assert p.grad is None or not p.grad.any(), n
            continue
        torch.testing.assert_close(p.grad, want[n].grad, rtol=1e-6, atol=1e-9, msg=n)
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0 and model.mtp[1].eh_proj.weight.grad.abs().sum() > 0


# ---- the one training objective ------------------------------------------------------------------

def _reference_objective(model, micro):
    """float64 by hand: CE and each MTP depth as token means over the WHOLE step, balance as the mean over
    micro-batches."""
    logits, labels, mtp_logits, bal = [], [], [[] for _ in range(CFG.num_nextn_predict_layers)], []
    for x, y in micro:
        out = model(x, labels=y)
        logits.append(out.logits.double().flatten(0, 1))
        labels.append(y.flatten())
        bal.append(out.balance_loss.double())
        B, T = x.shape
        cos, sin = model.model.rotary_emb(torch.arange(T).expand(B, T))
        for k, (h_k, _) in enumerate(model.mtp_forward(out.hidden_states, model.mtp_embeddings(x), cos, sin), 1):
            lab = F.pad(y[:, k:], (0, k), value=-100)
            mtp_logits[k - 1].append((model.lm_head(h_k).double().flatten(0, 1), lab.flatten()))
    ce = F.cross_entropy(torch.cat(logits), torch.cat(labels), ignore_index=-100)
    depths = [F.cross_entropy(torch.cat([a for a, _ in d]), torch.cat([b for _, b in d]), ignore_index=-100)
              for d in mtp_logits]
    return ce, torch.stack(depths).mean(), torch.stack(bal).mean()


def test_training_loss_is_the_token_mean_over_the_step():
    """Micro-batches with different target counts: the objective and the reported losses equal the float64
    token means over the whole step. Weighting each micro-batch's MTP mean by 1/m (the old single-process
    trainer) gives the mean of means instead, off by ~1e-2 here."""
    micro = _micro()
    model = _model()
    with torch.no_grad():
        ce, mtp, bal = _reference_objective(model, micro)
        totals = sum(target_counts(y, CFG.num_nextn_predict_layers) for _, y in micro)
        total = 0.0
        for x, y in micro:
            out = model(x, labels=y)
            loss, _ = training_loss(out.loss, out.mtp_losses, out.balance_loss,
                                    target_counts(y, CFG.num_nextn_predict_layers), totals,
                                    mtp_lambda=LAM, balance_alpha=ALPHA, micro_batches=len(micro))
            total += float(loss)
        mean_of_means = sum(float(model(x, labels=y).mtp_loss) for x, y in micro) / len(micro)
    assert total == pytest.approx(float(ce + LAM * mtp + ALPHA * bal), rel=1e-6)
    assert abs(mean_of_means - float(mtp)) > 1e-3            # the test data tells the two weightings apart
    got = forward_backward(_model(), micro, TrainConfig(mtp_lambda=LAM, balance_alpha=ALPHA), torch.device("cpu"))
    assert got == pytest.approx((float(ce), float(mtp), float(bal)), rel=1e-6)


def test_training_loss_scales_by_dp_and_splits_the_balance_over_ranks():
    """Under dp ranks, each rank's CE/MTP term is scaled by dp (data parallel averages gradients) while the
    reported shares sum over ranks to the step's values."""
    ce, mtp_ce, bal = torch.tensor(2.0), torch.tensor([3.0, 4.0]), torch.tensor(0.5)
    counts, totals = torch.tensor([10, 9, 8]), torch.tensor([40, 36, 32])
    loss, parts = training_loss(ce, mtp_ce, bal, counts, totals, mtp_lambda=0.1, balance_alpha=0.01,
                                micro_batches=2, dp=4)
    ce_share, mtp_share = 2.0 * 10 / 40, (3.0 * 9 / 36 + 4.0 * 8 / 32) / 2
    assert float(loss) == pytest.approx(4 * (ce_share + 0.1 * mtp_share) + 0.01 * 0.5 / 2)
    assert parts.tolist() == pytest.approx([ce_share, mtp_share, 0.5 / 2 / 4])
