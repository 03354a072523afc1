"""The low-latency (decode) mode of flashep.Buffer: DeepEP V1's low_latency_* methods, same
arguments, outputs and semantics (../shared/docs/interface.md, "Low-latency mode").

How it moves data (the contract leaves it to the implementation): each token travels once per
destination rank and is expanded into its experts' rows there; combine reduces each rank's experts
(weighted, float32) before sending one BF16 partial sum per (token, rank) back. Peers of the NVLink
domain get direct stores; other peers (or all, with allow_nvlink_for_low_latency_mode=False) get
NVSHMEM puts.

Streams: without `async_finish` or the hook, the kernel runs on the current stream (capturable in
a CUDA graph). With `async_finish=True` it runs on the communication stream after the current one
and the returned EventOverlap keeps inputs and outputs alive. With `return_recv_hook=True` only the
send phase is launched on the current stream; calling `hook()` launches the receive phase on the
stream current then. Between the two no SM is held.

Rules the double buffer imposes (checked here, raising before anything is launched): at most two
calls may be sent and not yet received, and hooks run in the order of their calls, once each.

`use_logfmt=True` is accepted and gives a result within DeepEP's bound (it is exact BF16 on the
wire): the rank-reduced combine already sends fewer bytes than DeepEP's per-expert LogFMT, and the
LogFMT encoder itself is not implemented.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import _C
from .utils import DeviceMemory, EventOverlap, check_aligned, check_int, check_tensor, topk_idx_t


class LowLatencyHandle(tuple):
    """DeepEP's low-latency handle `(src_info, layout_range, T, H, E)`, a tuple, plus what flashep's
    combine needs: the combine plan tensor, the top-k width and the id of the buffer that made it."""

    plan: torch.Tensor
    num_topk: int
    buffer_id: int

    def __new__(cls, src_info: torch.Tensor, layout_range: torch.Tensor, max_tokens: int, hidden: int,
                num_experts: int, plan: torch.Tensor, num_topk: int, buffer_id: int) -> "LowLatencyHandle":
        handle = super().__new__(cls, (src_info, layout_range, max_tokens, hidden, num_experts))
        handle.plan = plan
        handle.num_topk = num_topk
        handle.buffer_id = buffer_id
        return handle


class LowLatencyMixin:
    """Mixed into flashep.Buffer; uses its runtime, device, group and streams."""

    # ---- sizes -------------------------------------------------------------------------------------

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Bytes of the low-latency region for (T, H, R, E): pass it as num_rdma_bytes."""
        return _C.low_latency_region_bytes_hint(
            check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, minimum=1),
            check_int("hidden", hidden, minimum=1), check_int("num_ranks", num_ranks, minimum=1),
            check_int("num_experts", num_experts, minimum=1))

    # ---- the hook order ----------------------------------------------------------------------------

    def _ll_state(self) -> dict:
        state = getattr(self, "_ll", None)
        if state is None:
            state = {"pending": [], "next_id": 0}
            self._ll = state
        return state

    def _ll_begin_send(self, hooked: bool) -> Optional[int]:
        """Before a send phase: refuses a third call in flight; registers a hooked call."""
        state = self._ll_state()
        if len(state["pending"]) >= 2:
            raise RuntimeError("flashep: two low-latency calls are waiting for their hooks; call a hook before "
                               "another low-latency call (the buffer holds two calls' data at most)")
        if not hooked:
            return None
        call_id = state["next_id"]
        state["next_id"] += 1
        state["pending"].append(call_id)
        return call_id

    def _ll_hook(self, call_id: int, launch: Callable[[], None]) -> Callable[[], None]:
        def hook() -> None:
            pending = self._ll_state()["pending"]
            if call_id not in pending:
                raise RuntimeError("flashep: this low-latency hook has run already")
            if pending[0] != call_id:
                raise RuntimeError("flashep: low-latency hooks must run in the order of their calls (an earlier "
                                   "call's hook has not run)")
            launch()
            pending.pop(0)
        return hook

    # ---- checks ------------------------------------------------------------------------------------

    def _require_low_latency(self, op: str) -> None:
        if not self.low_latency_mode or self.num_rdma_bytes == 0:
            raise RuntimeError(f"flashep: {op} needs Buffer(..., low_latency_mode=True, num_rdma_bytes="
                               "Buffer.get_low_latency_rdma_size_hint(T, H, R, E))")

    def _ll_check_stats(self, name: str, tensor: Any, dtype: torch.dtype, size: int) -> Optional[torch.Tensor]:
        if tensor is None:
            return None
        return check_tensor(name, tensor, dtype, self._device, (size,))

    def _ll_launch_mode(self, async_finish: bool, return_recv_hook: bool) -> None:
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook exclude each other")

    # ---- dispatch ----------------------------------------------------------------------------------

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False) -> Tuple[Any, torch.Tensor, LowLatencyHandle, EventOverlap, Any]:
        """Returns (recv_x, recv_count, handle, event, hook); recv_x is (fp8 [L, R*T, H], scales) with
        FP8, else bf16 [L, R*T, H]. See the module docstring for streams and the hook."""
        self._require_low_latency("low_latency_dispatch")
        self._ll_launch_mode(async_finish, return_recv_hook)
        runtime = self._rt()
        num_ranks = self.group_size
        max_tokens = check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, minimum=1)
        num_experts = self._check_num_experts(num_experts)
        check_tensor("x", x, torch.bfloat16, self._device, (None, None))
        check_aligned("x", x)
        num_tokens, hidden = x.size(0), x.size(1)
        if num_tokens > max_tokens:
            raise ValueError(f"x has {num_tokens} tokens but num_max_dispatch_tokens_per_rank is {max_tokens}")
        if hidden == 0 or hidden % 128 != 0:
            raise ValueError(f"hidden must be a positive multiple of 128, got {hidden}")
        num_topk = self._check_topk_idx(topk_idx, num_tokens)
        if use_ue8m0 and not (use_fp8 and round_scale):
            raise ValueError("use_ue8m0 requires use_fp8=True and round_scale=True")
        if use_ue8m0 and hidden % 512 != 0:
            raise ValueError(f"use_ue8m0 needs hidden % 512 == 0, got {hidden}")
        num_local = num_experts // num_ranks
        recv_stats = self._ll_check_stats("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats,
                                          torch.int32, num_local)
        wait_stats = self._ll_check_stats("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats,
                                          torch.int64, num_ranks)
        self._check_topk_values(topk_idx, num_experts)
        # The C++ core checks the buffer size, T, H, E and K limits again before anything runs.
        _C.low_latency_region_bytes_hint(max_tokens, hidden, num_ranks, num_experts)

        current = torch.cuda.current_stream(self._device)
        stream = self._comm_stream if async_finish else current
        if async_finish:
            stream.wait_stream(current)
        rows = num_ranks * max_tokens
        # Host time matters at decode sizes: three allocations (the int outputs share one).
        plan_ints = _C.low_latency_plan_ints(num_ranks, max_tokens, num_topk)
        ints = num_local + num_local * rows + plan_ints
        ints += ints % 2  # layout_range (int64) after them, 8-byte aligned
        if async_finish:
            with torch.cuda.stream(stream):
                recv_x, recv_scales, words = self._ll_alloc(use_fp8, use_ue8m0, num_local, rows, hidden, ints,
                                                            num_local * num_ranks)
        else:
            recv_x, recv_scales, words = self._ll_alloc(use_fp8, use_ue8m0, num_local, rows, hidden, ints,
                                                        num_local * num_ranks)
        int_words = words[:ints]
        recv_count = int_words[:num_local]
        src_info = int_words[num_local:num_local + num_local * rows].view(num_local, rows)
        plan = int_words[num_local + num_local * rows:num_local + num_local * rows + plan_ints]
        layout_range = words[ints:].view(torch.int64).view(num_local, num_ranks)
        handle = LowLatencyHandle(src_info, layout_range, max_tokens, hidden, num_experts, plan, num_topk, runtime.id)
        args = dict(x=x.data_ptr(), topk_idx=topk_idx.data_ptr(), num_tokens=num_tokens, hidden=hidden,
                    num_topk=num_topk, max_tokens=max_tokens, num_experts=num_experts, use_fp8=bool(use_fp8),
                    round_scale=bool(round_scale), use_ue8m0=bool(use_ue8m0), recv_x=recv_x.data_ptr(),
                    recv_scales=0 if recv_scales is None else recv_scales.data_ptr(), recv_count=recv_count.data_ptr(),
                    recv_stats=0 if recv_stats is None else recv_stats.data_ptr(),
                    wait_stats=0 if wait_stats is None else wait_stats.data_ptr(), src_info=src_info.data_ptr(),
                    layout_range=layout_range.data_ptr(), plan=plan.data_ptr())
        call_id = self._ll_begin_send(return_recv_hook)
        phases = _C.kLowLatencySend if return_recv_hook else _C.kLowLatencyBoth
        _C.ll_dispatch(runtime, phases=phases, stream=stream.cuda_stream, **args)
        kept = (x, topk_idx, recv_x, recv_scales, words, recv_stats, wait_stats)
        hook = None
        if return_recv_hook:
            def receive() -> None:
                _C.ll_dispatch(runtime, phases=_C.kLowLatencyReceive,
                               stream=torch.cuda.current_stream(self._device).cuda_stream, **args)
                del kept_alive[:]
            kept_alive: List[Any] = list(kept)
            hook = self._ll_hook(call_id, receive)
        event = self._ll_finish(stream, async_finish, kept)
        out = (recv_x, recv_scales) if use_fp8 else recv_x
        return out, recv_count, handle, event, hook

    def _ll_alloc(self, use_fp8: bool, use_ue8m0: bool, num_local: int, rows: int, hidden: int, ints: int,
                  longs: int):
        dev = self._device
        recv_x = torch.empty((num_local, rows, hidden), dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16,
                             device=dev)
        recv_scales = None
        if use_fp8 and use_ue8m0:
            recv_scales = torch.empty((num_local, hidden // 512, rows), dtype=torch.int32, device=dev).transpose(1, 2)
        elif use_fp8:
            recv_scales = torch.empty((num_local, hidden // 128, rows), dtype=torch.float32, device=dev).transpose(1, 2)
        words = torch.empty((ints + 2 * longs,), dtype=torch.int32, device=dev)
        return recv_x, recv_scales, words

    def _ll_finish(self, stream: torch.cuda.Stream, async_finish: bool, kept: Tuple[Any, ...]) -> EventOverlap:
        if not async_finish:
            return EventOverlap(None)
        tensors = tuple(t for t in kept if isinstance(t, torch.Tensor))
        for tensor in tensors:
            tensor.record_stream(stream)
        return EventOverlap(stream.record_event(), extra_tensors=tensors)

    # ---- combine -----------------------------------------------------------------------------------

    def _ll_check_handle(self, handle: Any) -> LowLatencyHandle:
        if not isinstance(handle, LowLatencyHandle):
            raise ValueError("handle must be the one returned by low_latency_dispatch")
        if handle.buffer_id != self._rt().id:
            raise ValueError("handle was made by another Buffer")
        return handle

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: Any, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, EventOverlap, Any]:
        """Returns (combined_x bf16 [n, H], event, hook): combined_x[t] = sum over k of
        topk_weights[t, k] * (expert output of topk_idx[t, k] for t)."""
        self._require_low_latency("low_latency_combine")
        self._ll_launch_mode(async_finish, return_recv_hook)
        runtime = self._rt()
        handle = self._ll_check_handle(handle)
        src_info, layout_range, max_tokens, hidden, num_experts = handle
        num_ranks = self.group_size
        num_local = num_experts // num_ranks
        check_tensor("x", x, torch.bfloat16, self._device, (num_local, num_ranks * max_tokens, hidden))
        check_aligned("x", x)
        num_topk = self._check_topk_idx(topk_idx)
        num_tokens = topk_idx.size(0)
        if num_topk != handle.num_topk:
            raise ValueError(f"topk_idx has {num_topk} columns but the dispatch had {handle.num_topk}")
        if num_tokens > max_tokens:
            raise ValueError(f"topk_idx has {num_tokens} tokens but the dispatch's T is {max_tokens}")
        check_tensor("topk_weights", topk_weights, torch.float32, self._device, (num_tokens, num_topk))
        if out is not None:
            check_tensor("out", out, torch.bfloat16, self._device, (num_tokens, hidden))
            check_aligned("out", out)
        wait_stats = self._ll_check_stats("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats,
                                          torch.int64, num_ranks)
        del use_logfmt  # exact BF16 on the wire (module docstring)

        current = torch.cuda.current_stream(self._device)
        stream = self._comm_stream if async_finish else current
        if async_finish:
            stream.wait_stream(current)
        if out is None and async_finish:
            with torch.cuda.stream(stream):
                out = torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=self._device)
        elif out is None:
            out = torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=self._device)
        args = dict(x=x.data_ptr(), zero_copy=bool(zero_copy), topk_idx=topk_idx.data_ptr(),
                    topk_weights=topk_weights.data_ptr(), num_tokens=num_tokens, src_info=src_info.data_ptr(),
                    layout_range=layout_range.data_ptr(), plan=handle.plan.data_ptr(), max_tokens=max_tokens,
                    hidden=hidden, num_experts=num_experts, num_topk=num_topk, out=out.data_ptr(),
                    wait_stats=0 if wait_stats is None else wait_stats.data_ptr())
        call_id = self._ll_begin_send(return_recv_hook)
        phases = _C.kLowLatencySend if return_recv_hook else _C.kLowLatencyBoth
        _C.ll_combine(runtime, phases=phases, stream=stream.cuda_stream, **args)
        kept = (x, topk_idx, topk_weights, out, handle.plan, wait_stats)
        hook = None
        if return_recv_hook:
            receive_args = dict(args, zero_copy=False)

            def receive() -> None:
                _C.ll_combine(runtime, phases=_C.kLowLatencyReceive,
                              stream=torch.cuda.current_stream(self._device).cuda_stream, **receive_args)
                del kept_alive[:]
            kept_alive: List[Any] = list(kept)
            hook = self._ll_hook(call_id, receive)
        event = self._ll_finish(stream, async_finish, kept)
        return out, event, hook

    def get_next_low_latency_combine_buffer(self, handle: Any) -> torch.Tensor:
        """bf16 [L, R*T, H] view of the buffer half the next low_latency_combine(zero_copy=True) reads."""
        self._require_low_latency("get_next_low_latency_combine_buffer")
        handle = self._ll_check_handle(handle)
        _, _, max_tokens, hidden, num_experts = handle
        num_local = num_experts // self.group_size
        rows = self.group_size * max_tokens
        pointer = _C.ll_combine_buffer(self._rt(), max_tokens, hidden, num_experts, handle.num_topk)
        memory = DeviceMemory(pointer, num_local * rows * hidden * 2)
        return torch.as_tensor(memory, device=self._device).view(torch.bfloat16).view(num_local, rows, hidden)

    # ---- cleaning and masks ------------------------------------------------------------------------

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Collective: resets the low-latency signals and sequence numbers of every rank (after
        high-throughput use of the buffer, or to recover from an interrupted call sequence)."""
        self._require_low_latency("clean_low_latency_buffer")
        _C.low_latency_region_bytes_hint(check_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank,
                                                   minimum=1), check_int("hidden", hidden, minimum=1),
                                         self.group_size, self._check_num_experts(num_experts))
        torch.cuda.synchronize(self._device)
        dist.barrier(group=self.group)
        _C.ll_clean(self._rt(), torch.cuda.current_stream(self._device).cuda_stream)
        torch.cuda.synchronize(self._device)
        dist.barrier(group=self.group)
        self._ll_state()["pending"].clear()

    def _require_shrink(self, op: str) -> None:
        if not self.enable_shrink:
            raise RuntimeError(f"flashep: {op} requires Buffer(..., enable_shrink=True)")

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Sets (mask=True) or clears the mask of `rank_to_mask` on this rank."""
        self._require_shrink("low_latency_update_mask_buffer")
        rank_to_mask = check_int("rank_to_mask", rank_to_mask, minimum=0, maximum=self.group_size - 1)
        _C.ll_update_mask(self._rt(), rank_to_mask, bool(mask), torch.cuda.current_stream(self._device).cuda_stream)

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Copies the mask (int32 [R], 1 = masked) into `mask_status`."""
        self._require_shrink("low_latency_query_mask_buffer")
        check_tensor("mask_status", mask_status, torch.int32, self._device, (self.group_size,))
        _C.ll_query_mask(self._rt(), mask_status.data_ptr(), torch.cuda.current_stream(self._device).cuda_stream)

    def low_latency_clean_mask_buffer(self) -> None:
        """Clears every rank's mask on this rank."""
        self._require_shrink("low_latency_clean_mask_buffer")
        _C.ll_clean_mask(self._rt(), torch.cuda.current_stream(self._device).cuda_stream)


__all__ = ["LowLatencyHandle", "LowLatencyMixin", "topk_idx_t"]
