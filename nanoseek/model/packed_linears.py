"""Packed linears for decoding: the projections that read one input run as ONE GEMM.

A decode step multiplies a few rows by each weight, so a small GEMM costs its launch, not its bytes: on an
H200, inside a CUDA graph, Qwen2.5-0.5B's q, k and v projections of 128 rows take 11.2 us as three GEMMs and
3.9 us as one; gate and up 9.4 us and 6.7 us. A layer names its groups in `PACK` (q|k|v, gate|up, MLA's q_a|kv_a);
`pack(model)` makes each group's weights (and biases) row blocks of one [Σ out, in] tensor by re-pointing the
parameters' `.data` at views of it: the same Parameter objects, the same values and names, no second copy,
so optimizer steps (in place) and state dicts see the parameters as before, and the packed tensor always holds
the current weights. Inside `decoding()` a layer runs the group as one `F.linear` and splits its output;
everywhere else (training, scoring) the separate linears run as before.

`pack` re-points again whatever lost its view (`model.to(...)`, `param.data = ...`) and reports whether any
weight moved, so the rollout engine can drop CUDA graphs that read the old storage. Groups it cannot pack stay
separate: a LoRA-wrapped or FP8 linear (not a plain `nn.Linear`), FSDP's sharded parameters, mixed dtypes or
devices, a bias on some but not all.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVE = False


@contextlib.contextmanager
def decoding():
    """Packed groups run as one GEMM inside this context (the rollout engine's decode steps and prefill)."""
    global _ACTIVE
    before, _ACTIVE = _ACTIVE, True
    try:
        yield
    finally:
        _ACTIVE = before


class Packable(nn.Module):
    """A module whose `PACK` names one group of linears that read the same input. Its packed tensors are not part
    of its state: a deep copy or a pickle of the model leaves them out (a copy's parameters are its own, and a
    packed tensor carried along would be dead memory, e.g. an RL reference model copied from a decoded policy)."""

    PACK: tuple[str, ...] = ()
    _packed = None

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_packed", None)
        return state


def run(module: Packable, x: torch.Tensor) -> list[torch.Tensor]:
    """[module.<name>(x) for name in module.PACK]: one GEMM over the packed weights inside `decoding()` when
    `pack` packed this group, one linear each otherwise."""
    packed = module._packed
    if _ACTIVE and packed is not None:
        weight, bias, _, sizes = packed
        return list(F.linear(x, weight, bias).split(sizes, dim=-1))
    return [getattr(module, n)(x) for n in module.PACK]


def _packable(lins: list, devices: tuple[str, ...]) -> bool:
    has_bias = {m.bias is not None for m in lins}
    return (all(type(m) is nn.Linear for m in lins) and len(has_bias) == 1
            and all(type(p.data) is torch.Tensor for m in lins for p in m.parameters())
            and len({(p.dtype, p.device) for m in lins for p in m.parameters()}) == 1
            and lins[0].weight.device.type in devices)


def _views_of(params: list[torch.Tensor], whole: torch.Tensor) -> bool:
    """Whether params are, in order, the consecutive row blocks of `whole`."""
    offset = 0
    for p in params:
        if p.dtype != whole.dtype or p.data_ptr() != whole.data_ptr() + offset * whole.element_size():
            return False
        offset += p.numel()
    return offset == whole.numel()


def _point(params: list[torch.Tensor], whole: torch.Tensor, copy: bool) -> None:
    """Re-point each parameter at its row block of `whole`, first copying its values there when `copy`."""
    for p, view in zip(params, whole.split([p.shape[0] for p in params])):
        if p.data_ptr() != view.data_ptr():
            if copy:
                view.copy_(p.detach())
            p.data = view


def pack(model: nn.Module, devices: tuple[str, ...] = ("cuda",)) -> bool:
    """Pack every `PACK` group of `model` (module docstring); True when a weight moved to new storage.

    Only weights on `devices`: a CPU checkpoint writer would see the packed parameters as tensors sharing one
    storage (safetensors refuses those), and the CPU engine gains little; tests pack CPU models explicitly.
    Packed tensors are ordinary ones even when the caller decodes under `torch.inference_mode()` (parameters made
    of inference tensors could not be trained afterwards)."""
    with torch.inference_mode(False), torch.no_grad():
        return _pack(model, devices)


def _pack(model: nn.Module, devices: tuple[str, ...]) -> bool:
    moved = False
    for m in model.modules():
        names = getattr(m, "PACK", ())
        if not names:
            continue
        lins = [getattr(m, n) for n in names]
        if not _packable(lins, devices):
            m._packed = None
            continue
        weights = [x.weight for x in lins]
        biases = [x.bias for x in lins] if lins[0].bias is not None else None
        packed = m._packed
        if packed is not None and packed[2] == names and _views_of(weights, packed[0]) and (
                biases is None or _views_of(biases, packed[1])):
            continue
        fresh = packed is None or packed[0].shape != (sum(w.shape[0] for w in weights), weights[0].shape[1]) \
            or packed[0].dtype != weights[0].dtype or packed[0].device != weights[0].device \
            or (packed[1] is None) != (biases is None)
        if fresh:                                                   # first time, or the shapes changed
            weight = torch.cat([w.detach() for w in weights])
            bias = torch.cat([b.detach() for b in biases]) if biases is not None else None
        else:                                                       # the old storage: graphs reading it stay valid
            weight, bias = packed[0], packed[1]
        _point(weights, weight, copy=not fresh)
        if biases is not None:
            _point(biases, bias, copy=not fresh)
        m._packed = (weight, bias, names, [w.shape[0] for w in weights])
        moved = True
    return moved
