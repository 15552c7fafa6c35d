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

Low-precision twins (`twins`): an RL policy keeps fp32 master weights and decodes under bf16 autocast, so every
decode step would cast every weight again (read 4 bytes, write 2, read the 2 back: 4x the bytes of a bf16 model;
a 0.5B policy decoded at 45-52K new tokens/s against 79K for the same model in bf16 on an H200). `twins(model,
low)` keeps one bf16 copy of exactly the weights autocast casts (plain `nn.Linear` weights and biases, packed
groups as one tensor, the `TWINS` parameters a module names, e.g. the grouped experts), refreshed in place once per
`generate` call; the decode step runs the model on them (`torch.func.functional_call`), and `run` reads a packed
group's twin whenever its members' weights are twins.
The numbers are those of autocast's own cast (the same rounding of the same values), so decoding is bit-identical;
weights autocast leaves alone (the MoE router's fp32 gate, embeddings, norms) stay the masters.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVE = False     # inside decoding(): packed groups run as one GEMM


@contextlib.contextmanager
def decoding():
    """Packed groups run as one GEMM inside this context (the rollout engine's decode steps and prefill)."""
    global _ACTIVE
    before, _ACTIVE = _ACTIVE, True
    try:
        yield
    finally:
        _ACTIVE = before


class Group(NamedTuple):
    """A packed group: weight [Σ out, in] (bias [Σ out]) whose row blocks ARE the parameters `names` (sizes rows
    each); low_weight / low_bias: their twins in the autocast dtype, where `twins` made them."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    names: tuple[str, ...]
    sizes: list[int]
    low_weight: torch.Tensor | None = None
    low_bias: torch.Tensor | None = None


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
    `pack` packed this group, one linear each otherwise. Where the members' weights are their low-precision
    twins (the decode step runs the model on `twins` through functional_call), the group's twin is read."""
    g: Group | None = module._packed
    if _ACTIVE and g is not None:
        low = g.low_weight is not None and getattr(module, module.PACK[0]).weight.dtype == g.low_weight.dtype
        return list(F.linear(x, g.low_weight if low else g.weight, g.low_bias if low else g.bias)
                    .split(g.sizes, dim=-1))
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
        packed: Group | None = m._packed
        if packed is not None and packed.names == names and _views_of(weights, packed.weight) and (
                biases is None or _views_of(biases, packed.bias)):
            continue
        fresh = packed is None or packed.weight.shape != (sum(w.shape[0] for w in weights), weights[0].shape[1]) \
            or packed.weight.dtype != weights[0].dtype or packed.weight.device != weights[0].device \
            or (packed.bias is None) != (biases is None)
        if fresh:                                                   # first time, or the shapes changed
            weight = torch.cat([w.detach() for w in weights])
            bias = torch.cat([b.detach() for b in biases]) if biases is not None else None
        else:                                                       # the old storage: graphs reading it stay valid
            weight, bias = packed.weight, packed.bias
        _point(weights, weight, copy=not fresh)
        if biases is not None:
            _point(biases, bias, copy=not fresh)
        m._packed = Group(weight, bias, names, [w.shape[0] for w in weights])
        moved = True
    return moved


# model -> (key, {name: twin}, [(twin, master)], the packed modules: kept so the ids in the key stay theirs)
_TWINS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _cast_by_autocast(model: nn.Module):
    """(name, parameter) of every weight autocast casts when `model` runs: plain `nn.Linear` weights and
    biases (not LoRA or FP8 linears, which run their own arithmetic) and the parameters a module names in
    `TWINS`. Tied weights appear under each module's name (the embedding's lookup reads the master)."""
    for prefix, m in model.named_modules():
        names = ("weight", "bias") if type(m) is nn.Linear else getattr(m, "TWINS", ())
        for n in names:
            p = getattr(m, n, None)
            if p is not None:
                yield (f"{prefix}.{n}" if prefix else n), p


def twins(model: nn.Module, low: torch.dtype | None, devices: tuple[str, ...] = ("cuda",)
          ) -> tuple[dict[str, torch.Tensor], bool]:
    """The model's weights in `low` (the autocast dtype) as {parameter name: twin} for `functional_call`, their
    values refreshed from the masters now (module docstring), and whether their storage is new (CUDA graphs
    reading the old twins must go). Empty when nothing needs a twin: `low` None, or no wider weight on `devices`.
    Call after `pack`: a packed group's twins are row blocks of one low tensor that `run` reads."""
    if low is None:
        return {}, False
    with torch.inference_mode(False), torch.no_grad():
        sources = [(n, p) for n, p in _cast_by_autocast(model) if p.device.type in devices
                   and type(p.data) is torch.Tensor and p.is_floating_point() and p.element_size() > low.itemsize]
        groups = [m for m in model.modules() if getattr(m, "_packed", None) is not None
                  and m._packed.weight.device.type in devices and m._packed.weight.element_size() > low.itemsize]
        key = (low, [(n, p.shape, p.device) for n, p in sources], [id(m._packed) for m in groups])
        kept = _TWINS.get(model)
        if kept is not None and kept[0] == key:
            _, tw, pairs, _ = kept
            torch._foreach_copy_([t for t, _ in pairs], [s for _, s in pairs])
            return tw, False
        if not sources:
            _TWINS.pop(model, None)
            return {}, kept is not None
        tw, pairs, done, packed = {}, [], set(), set(map(id, groups))
        for prefix, m in model.named_modules():
            g = m._packed if id(m) in packed else None
            if g is None:
                continue
            lw = torch.empty_like(g.weight, dtype=low)
            lb = torch.empty_like(g.bias, dtype=low) if g.bias is not None else None
            pairs += [(lw, g.weight)] + ([(lb, g.bias)] if lb is not None else [])
            m._packed = g._replace(low_weight=lw, low_bias=lb)
            for n, w, b in zip(g.names, lw.split(g.sizes), lb.split(g.sizes) if lb is not None else g.names):
                lin = getattr(m, n)
                tw[f"{prefix}.{n}.weight"] = w
                done.add(id(lin.weight))
                if lb is not None:
                    tw[f"{prefix}.{n}.bias"] = b
                    done.add(id(lin.bias))
        for n, p in sources:
            if id(p) not in done:
                tw[n] = torch.empty_like(p, dtype=low, memory_format=torch.contiguous_format)
                pairs.append((tw[n], p))
        torch._foreach_copy_([t for t, _ in pairs], [s for _, s in pairs])
        key = (low, key[1], [id(m._packed) for m in groups])         # the groups now carry their twins
        _TWINS[model] = (key, tw, pairs, groups)
        return tw, True
