"""The preallocated KV caches of decoding: MLA's latent cache (DeepSeek models) and the GQA cache (dense ones).

Each holds every layer in one tensor allocated once (`new_cache` of the model), with `length` slots filled;
a forward with a cache writes its T new slots at [length, length+T) of each layer and attends over
[0, length+T). The write happens in place (`write_slots`): the rollout engine captures decode steps as CUDA
graphs and compiles them, and neither may allocate a fresh cache per step.
"""

from __future__ import annotations

import torch

from nanoseek.errors import UserError


def write_slots(cache: torch.Tensor, layer: int, dim: int, start: int, new: torch.Tensor) -> None:
    """cache[layer] at slots [start, start+T) along `dim` (a dim of `cache`) = new (laid out as cache[layer]).

    Eager: a slice assignment (one copy kernel). Under torch.compile the same assignment, a write into a view
    of a graph input, is functionalised into a copy of the WHOLE cache per layer (the compiled decode step of a
    0.5B model at batch 128 spent most of its time copying caches); one `index_put_` on the base tensor, with
    both indices as device tensors, is written in place instead."""
    T = new.shape[dim - 1]
    if not torch.compiler.is_compiling():
        cache.select(0, layer).narrow(dim - 1, start, T).copy_(new)
        return
    index: list[torch.Tensor | None] = [None] * cache.dim()
    index[0] = torch.full((1,), layer, device=cache.device)
    index[dim] = torch.arange(start, start + T, device=cache.device)
    # two advanced indices apart: their broadcast dim [T] comes first, then the sliced dims in order
    torch.ops.aten.index_put_(cache, index, new.movedim(dim - 1, 0))


def copy_slot(cache: torch.Tensor, dim: int, rows: torch.Tensor, dst: torch.Tensor, src: int) -> None:
    """For each batch row b = rows[i]: cache[:, b, ..., dst[i]] = cache[:, b, ..., src], slots along `dim`
    (batch rows are dim 1), for every layer at once. One `index_put_` on the base tensor, for the reason
    `write_slots` gives (a write through a view of it costs a whole-cache copy under torch.compile)."""
    index: list[torch.Tensor | None] = [None] * (dim + 1)
    index[1], index[dim] = rows, dst
    value = cache.select(dim, src)                                  # [L, B, ...] without the slot dim
    # advanced indices side by side (dim 2) keep their place; apart, their broadcast dim [B] comes first
    torch.ops.aten.index_put_(cache, index, value if dim == 2 else value.movedim(1, 0))


class KVCache:
    """What both caches share: their tensors (named by `names`, batch rows at dim 1, slots at `slot_dims`),
    `length` filled slots, and row selection."""

    names: tuple[str, ...] = ()
    slot_dims: tuple[int, ...] = ()

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, n) for n in self.names]

    @property
    def max_len(self) -> int:
        return self.tensors[0].shape[self.slot_dims[0]]

    def _check_room(self, end: int) -> None:
        if end > self.max_len:
            raise UserError(f"KV cache holds {self.max_len} tokens but {end} are needed; create it with a larger "
                            "max_len")

    def select(self, rows: torch.Tensor) -> "KVCache":
        """Keep (and reorder) batch rows: a long index or a bool mask [B]. Returns self."""
        for n in self.names:
            setattr(self, n, getattr(self, n)[:, rows])
        return self

    reorder = select


class MLACache(KVCache):
    """Latent KV cache: latent [L, B, S, kv_lora_rank + qk_rope_head_dim]; slots [0, length) are filled."""

    names, slot_dims = ("latent",), (2,)

    def __init__(self, latent: torch.Tensor):
        self.latent = latent
        self.length = 0

    def update(self, layer: int, new: torch.Tensor) -> torch.Tensor:
        """Write new [B, T, D] at slots [length, length+T) of `layer`; return slots [0, length+T)."""
        end = self.length + new.shape[1]
        self._check_room(end)
        write_slots(self.latent, layer, 2, self.length, new)
        return self.latent[layer, :, :end]


class DenseCache(KVCache):
    """Preallocated GQA cache: k, v [L, B, n_kv, S, head_dim]; slots [0, length) are filled."""

    names, slot_dims = ("k", "v"), (3, 3)

    def __init__(self, k: torch.Tensor, v: torch.Tensor):
        self.k, self.v = k, v
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, n_kv, T, hd] at slots [length, length+T) of `layer`; return slots [0, length+T)."""
        end = self.length + k.shape[2]
        self._check_room(end)
        write_slots(self.k, layer, 3, self.length, k)
        write_slots(self.v, layer, 3, self.length, v)
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]
