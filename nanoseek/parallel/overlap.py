"""Hide one micro-batch's all-to-all behind another's compute: DualPipe's overlapped F&B step (V3 §3.2.1).

In DualPipeV's steady state every rank runs the forward of micro-batch i and the backward of micro-batch j
together. Each MoE layer's forward is attention → dispatch (all-to-all) → experts → combine (all-to-all);
its backward runs the same chain in reverse. V3 interleaves the two so that while one chunk's tokens are on
the wire, the other chunk computes.

We get that interleaving without rewriting either pass: the forward runs on the calling thread and the
backward on a helper thread, and a *baton* lets exactly one of them compute at a time. Every all-to-all is
launched asynchronously (NCCL runs it on its own CUDA stream); the launching pass then hands the baton to
the other pass and waits for it back before it waits on its own communication. So the timeline of one rank
alternates  F:attn | B:expert-bwd | F:experts | B:attn-bwd ...  while the other pass's tokens travel.
The order in which passes launch collectives is fixed by the baton, hence identical on every rank of an
expert-parallel group, which is what matching collectives need. Forward-direction all-to-alls belong to the
F pass and backward-direction ones (autograd) to the B pass, whatever thread autograd runs them on.

`register(schedule)` plugs this into `torch.distributed.pipelining` through the runtime's
`register_custom_function(OVERLAP_F_B, fn)` hook (torch >= 2.10); without EP there is nothing to overlap
and the default sequential F-then-B is kept.
"""

from __future__ import annotations

import inspect
import threading

import torch

_ACTIVE: "_Baton | None" = None


class _Baton:
    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.holder = "F"
        self.done: set[str] = set()
        self.handoffs = 0

    def take(self, role: str) -> None:
        with self.cv:
            self.cv.wait_for(lambda: self.holder == role)

    def handoff(self, role: str) -> None:
        """Give the baton to the other pass (if it is still running) and wait to get it back."""
        other = "B" if role == "F" else "F"
        with self.cv:
            if other in self.done:
                return
            self.holder = other
            self.handoffs += 1
            self.cv.notify_all()
            self.cv.wait_for(lambda: self.holder == role)

    def finish(self, role: str) -> None:
        with self.cv:
            self.done.add(role)
            self.holder = "B" if role == "F" else "F"
            self.cv.notify_all()


def wait(work, role: str) -> None:
    """Wait for an async collective; inside an overlapped F&B step, let the other pass compute first."""
    baton = _ACTIVE
    if baton is not None and role not in baton.done:
        baton.handoff(role)
    work.wait()


def run_overlapped(forward_fn, backward_fn) -> int:
    """Run forward_fn() on this thread and backward_fn() on a helper thread, alternating at every
    all-to-all. Returns the number of handoffs (0 when neither pass communicated)."""
    global _ACTIVE
    baton = _Baton()
    errors: list[BaseException] = []

    def backward_thread() -> None:
        baton.take("B")
        try:
            if torch.cuda.is_available():
                torch.cuda.set_device(device)
            backward_fn()
        except BaseException as e:  # re-raised on the calling thread
            errors.append(e)
        finally:
            baton.finish("B")

    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    _ACTIVE = baton
    helper = threading.Thread(target=backward_thread, name="overlap-backward", daemon=True)
    helper.start()
    try:
        forward_fn()
    except BaseException as e:
        errors.append(e)
    finally:
        baton.finish("F")
        helper.join()
        _ACTIVE = None
    if errors:
        raise errors[0]
    return baton.handoffs


# ---- the torch.distributed.pipelining hook ---------------------------------------------------------

def register(schedule, stats: dict | None = None) -> bool:
    """Run the schedule's OVERLAP_F_B actions through `run_overlapped`. False if this torch lacks the hook."""
    from torch.distributed.pipelining import schedules as S

    if not (hasattr(schedule, "register_custom_function") and hasattr(S, "OVERLAP_F_B")):
        return False
    takes_loss_kwargs = "loss_kwargs" in inspect.signature(schedule._maybe_compute_loss).parameters

    def overlap_f_b(action, ctx) -> None:
        sched = ctx.schedule_ref
        stages = {s.stage_index: s for s in sched._stages}
        fwd, bwd = action.sub_actions
        f_stage, b_stage = stages[fwd.stage_index], stages[bwd.stage_index]
        f_mb, b_mb = fwd.microbatch_index, bwd.microbatch_index
        sched._assert_unsharded(f_stage)        # waits for FSDP all-gathers the runtime started
        sched._assert_unsharded(b_stage)
        # inputs first: the P2P receives the runtime posted for these two sub-actions
        if not f_stage.is_first and fwd.stage_index - 1 not in stages:
            S._wait_batch_p2p(sched.fwd_recv_ops.pop((fwd.stage_index, f_mb)))
        if not b_stage.is_last and bwd.stage_index + 1 not in stages:
            S._wait_batch_p2p(sched.bwd_recv_ops.pop((bwd.stage_index, b_mb)))
        loss = sched._maybe_get_loss(b_stage, b_mb)
        sched.backward_counter[bwd.stage_index] += 1
        last = sched.backward_counter[bwd.stage_index] == sched._n_microbatches

        def forward() -> None:
            out = f_stage.forward_one_chunk(f_mb, ctx.arg_mbs[f_mb], ctx.kwarg_mbs[f_mb])
            extra = (None,) if takes_loss_kwargs else ()
            sched._maybe_compute_loss(f_stage, out, ctx.target_mbs, f_mb, *extra)
            if fwd.stage_index + 1 in stages:   # V-shape: the next stage is on this rank, no P2P
                stages[fwd.stage_index + 1].set_local_fwd_input(out, f_mb)

        def backward() -> None:
            b_stage.backward_one_chunk(b_mb, loss=loss, full_backward=True, last_backward=last)
            if bwd.stage_index - 1 in stages:
                stages[bwd.stage_index - 1].set_local_bwd_input(b_stage.get_local_bwd_output(b_mb), b_mb)

        n = run_overlapped(forward, backward)
        if stats is not None:
            stats["overlapped_steps"] = stats.get("overlapped_steps", 0) + 1
            stats["handoffs"] = stats.get("handoffs", 0) + n

    schedule.register_custom_function(S.OVERLAP_F_B, overlap_f_b)
    return True
