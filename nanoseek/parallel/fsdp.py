"""Data parallel with FSDP2 (`torch.distributed.fsdp.fully_shard`): ZeRO-3 style sharding, per-block units.

Every decoder layer (and MTP module) is its own FSDP unit so that its parameters are all-gathered just
before use and its gradients reduce-scattered as soon as its backward ends; the root unit holds the
embedding, final norm and head. Under expert parallelism the routed experts of a layer differ between the
ep ranks, so they get their own unit over the `edp` mesh (ranks holding the same experts) instead of the
full dp mesh; `expert._ScaleGrad` makes FSDP's average over edp the exact global gradient.

Mixed precision through `MixedPrecisionPolicy`: parameters are all-gathered in `param_dtype` (bf16 on GPUs)
while the sharded master copy and the optimizer stay fp32; gradients are reduced in `reduce_dtype`.
With pipeline parallelism parameters stay unsharded between a step's micro-batches
(`reshard_after_forward=False`), as torchtitan does, to avoid one all-gather per micro-batch.

The root unit (embedding, norm, head) is never resharded after forward: its backward starts as soon as its
forward ends. FSDP2 does that for a root by default, but only when `reshard_after_forward` is not passed; we
pass False. Resharding it broke on torch 2.11: FSDP2 there finds the forward outputs to hang the pre-backward
all-gather on with `tree_flatten`, which treats a dataclass (our `ModelOutput`) as a leaf, so a resharded root
was never gathered again and the lm_head backward read freed storage ("setStorage: sizes [V, H] ... out of
bounds for storage of size 0"). Kept unsharded it needs no pre-backward hook; its post-backward (reduce-scatter,
reshard) still runs from FSDP's end-of-backward callback.
"""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.errors import UserError
from nanoseek.model.deepseek import DecoderLayer
from nanoseek.model.moe import MoE


def _dtype(name: str) -> torch.dtype:
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    except KeyError:
        raise UserError(f"parallel dtype {name!r} unknown; use float32 or bfloat16") from None


def blocks(module: nn.Module) -> list[nn.Module]:
    """Decoder layers and MTP modules under `module` (whole model or a pipeline stage), in order."""
    return [m for m in module.modules() if isinstance(m, DecoderLayer)]


def apply_fsdp(parts: list[nn.Module], ctx) -> None:
    """fully_shard every block of every part (in place), then each part's root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cfg = ctx.cfg
    mp = MixedPrecisionPolicy(param_dtype=_dtype(cfg.param_dtype), reduce_dtype=_dtype(cfg.reduce_dtype))
    reshard = cfg.pp == 1
    for part in parts:
        for block in blocks(part):
            if cfg.ep > 1 and isinstance(block.mlp, MoE):
                fully_shard(block.mlp.experts, mesh=ctx.edp_mesh, mp_policy=mp, reshard_after_forward=reshard)
            fully_shard(block, mesh=ctx.dp_mesh, mp_policy=mp, reshard_after_forward=reshard)
        fully_shard(part, mesh=ctx.dp_mesh, mp_policy=mp, reshard_after_forward=False)   # see docstring
