"""Gradient averaging for replicated data parallel, on the device or through the host (Fire-Flyer HFReduce).

Fire-Flyer's HFReduce (the cluster DeepSeek trained V2 on) does not all-reduce gradients on the GPU: it copies
them to pinned host memory, lets the CPUs reduce them across nodes, and copies the sum back, so the GPUs
keep computing the backward while the network and CPUs work. We do the same with stock pieces: gradients
are grouped in ~`bucket_mb` buckets in the order backward produces them; when a bucket's last gradient is
accumulated (a post-accumulate-grad hook) it is copied device→pinned host on a side CUDA stream and a
background thread reduces it over gloo on the CPU. `finish()` waits for the buckets and copies the averages
back. With `host=False` the same buckets go through the device backend instead (NCCL all-reduce), which is
what we measure HFReduce against (benchmarks/parallel.py).

Hooks only reduce while `armed` (the trainer disarms them for all but the last micro-batch of gradient
accumulation); whatever was not reduced during backward is reduced in `finish()`.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.distributed as dist


class _Bucket:
    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.ready = 0
        self.pending: Future | object | None = None     # a Future (host) or a dist Work (device)
        self.buf: torch.Tensor | None = None


class GradReducer:
    """Average `params`' gradients over `group`, bucket by bucket as the backward produces them."""

    def __init__(self, params, group=None, bucket_mb: float = 25.0, host: bool = False):
        self.params = [p for p in params if p.requires_grad]
        self.group, self.host, self.armed = group, host, True
        self.size = dist.get_world_size(group)
        self.cuda = any(p.is_cuda for p in self.params)
        self.buckets: list[_Bucket] = []
        cur, cur_bytes = [], 0
        for p in reversed(self.params):                 # backward visits the last layers first
            cur.append(p)
            cur_bytes += p.numel() * p.element_size()
            if cur_bytes >= bucket_mb * 2**20:
                self.buckets.append(_Bucket(cur))
                cur, cur_bytes = [], 0
        if cur:
            self.buckets.append(_Bucket(cur))
        self._bucket_of = {p: b for b in self.buckets for p in b.params}
        self._next = 0                                  # first bucket not yet launched
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hfreduce") if host else None
        self._copy_stream = torch.cuda.Stream() if (host and self.cuda) else None
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def _on_grad(self, p: torch.nn.Parameter) -> None:
        if not self.armed:
            return
        self._bucket_of[p].ready += 1
        # launch complete buckets strictly in order: every rank must issue the same collective sequence
        while self._next < len(self.buckets) and self.buckets[self._next].ready == len(self.buckets[self._next].params):
            self._launch(self.buckets[self._next])
            self._next += 1

    def _launch(self, b: _Bucket) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in b.params]
        if not self.host:
            b.buf = torch.cat([g.reshape(-1) for g in grads])
            b.pending = dist.all_reduce(b.buf, group=self.group, async_op=True)
            return
        n = sum(g.numel() for g in grads)
        if b.buf is None:
            b.buf = torch.empty(n, dtype=grads[0].dtype, pin_memory=self.cuda)
        done = None
        if self._copy_stream is not None:               # D2H on a side stream, after the grads exist
            self._copy_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._copy_stream):
                self._copy_into(b.buf, grads)
                done = torch.cuda.Event()
                done.record()
        else:
            self._copy_into(b.buf, grads)

        def reduce_on_cpu(buf=b.buf, done=done):
            if done is not None:
                done.synchronize()
            dist.all_reduce(buf, group=self.group)      # gloo: the CPUs do the summing
        b.pending = self._pool.submit(reduce_on_cpu)

    @staticmethod
    def _copy_into(buf: torch.Tensor, grads: list[torch.Tensor]) -> None:
        off = 0
        for g in grads:
            buf[off:off + g.numel()].copy_(g.reshape(-1), non_blocking=True)
            off += g.numel()

    def finish(self) -> None:
        """Reduce what is still outstanding, wait for everything, write the averages into `.grad`."""
        for b in self.buckets[self._next:]:
            self._launch(b)
        self._next = 0
        for b in self.buckets:
            b.pending.result() if isinstance(b.pending, Future) else b.pending.wait()
            off = 0
            for p in b.params:
                n = p.numel()
                avg = b.buf[off:off + n].view_as(p).to(p.device, non_blocking=True).div_(self.size)
                if p.grad is None:
                    p.grad = avg.to(p.dtype).clone()     # the host buffer is reused next step
                else:
                    p.grad.copy_(avg)
                off += n
            b.pending, b.ready = None, 0

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        if self._pool is not None:
            self._pool.shutdown()
