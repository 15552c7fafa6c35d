"""The training objective of one optimizer step (V3 §2.1.2, §2.2), composed in one place.

    L = CE + λ·MTP + α·L_bal
    CE    = Σ_{targets of the step} ce / N                         N   = the step's targets (labels != -100)
    MTP   = (1/D) Σ_k Σ_{targets of depth k} ce_k / N_k           N_k = the step's targets of depth k
    L_bal = mean over the step's micro-batches (and dp ranks) of Σ_layers Σ_i f_i P_i

"The step" is every micro-batch of every data-parallel rank. A micro-batch contributes its mean CE times
its token share n/N (per depth for MTP: n_k/N_k), so the contributions add up to the mean over all the
step's tokens whatever the micro-batches hold. Weighting each micro-batch's mean by 1/m instead is the mean of
means: biased towards micro-batches with few targets as soon as their counts differ (SFT masks, MTP depths near
the end of short rows), and unlike the CE it would not match one big batch. Data parallel averages gradients
over the dp ranks, so each rank scales its share by dp to keep the global sum.

Used by the single-process trainer and the parallel runtime (whole model or pipeline stages) alike.
"""

from __future__ import annotations

import torch


def target_counts(labels: torch.Tensor, n_mtp: int) -> torch.Tensor:
    """[1 + D] long: targets of the main head and of each MTP depth k (labels shifted by k) in `labels` [B, T]."""
    valid = labels != -100
    return torch.stack([valid.sum()] + [valid[:, k:].sum() for k in range(1, n_mtp + 1)])


def training_loss(ce: torch.Tensor, mtp_ce: torch.Tensor | None, balance: torch.Tensor | None,
                  counts: torch.Tensor, totals: torch.Tensor, *, mtp_lambda: float, balance_alpha: float,
                  micro_batches: int, dp: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch's term of L, to backward; gradients summed over the step's micro-batches (and averaged
    over dp ranks) are those of L.

    ce: the micro-batch's mean next-token CE (scalar); mtp_ce: [D] its mean CE per MTP depth, or None;
    balance: its balance statistic (None where the caller injects α·L_bal elsewhere, as pipeline stages do);
    counts / totals: [1 + D] targets of this micro-batch / of the whole step (`target_counts`).
    Returns (loss scalar, detached [3] = this micro-batch's share of (CE, MTP, L_bal) in L's units, which sum
    over the step's micro-batches and dp ranks to the step's values).
    """
    share = counts.to(ce.dtype) / totals.to(ce.dtype).clamp_min(1)             # [1 + D]
    ce_part = ce * share[0]
    mtp_part = (mtp_ce * share[1:]).mean() if mtp_ce is not None and mtp_ce.numel() else ce.new_zeros(())
    bal_part = balance / micro_batches if balance is not None else ce.new_zeros(())
    loss = dp * (ce_part + mtp_lambda * mtp_part) + balance_alpha * bal_part
    return loss, torch.stack([ce_part, mtp_part, bal_part.float() / dp]).detach()
