"""The low-latency (decode) mode of flashep.Buffer: DeepEP V1's low_latency_* methods, same
arguments, outputs and semantics (../shared/docs/interface.md, "Low-latency mode").

How it moves data (the contract leaves it to the implementation): each token travels once per
destination rank and is expanded into its experts' rows there; combine reduces each rank's experts
(weighted, float32) before sending one BF16 partial sum per (token, rank) back. That needs the
token owner's weights on the expert side, so a hooked combine whose peers are all on NVLink sends
each expert row to its (token, top-k slot) instead and weights it in the hook: its send phase then
waits for no peer's call (the hook reads topk_idx and topk_weights, which stay alive until it runs;
change them only after it has). Peers of the NVLink domain get direct stores; other peers (or all, with
allow_nvlink_for_low_latency_mode=False) get NVSHMEM puts.

Streams: without `async_finish` or the hook, the kernel runs on the current stream (capturable in
a CUDA graph). With `async_finish=True` it runs on the communication stream after the current one
and the returned EventOverlap keeps inputs and outputs alive. With `return_recv_hook=True` only the
send phase is launched on the current stream; calling `hook()` launches the receive phase on the
stream current then. Between the two no SM is held.

Rules the double buffer imposes (checked here, raising before anything is launched): at most two
calls may be sent and not yet received; each hook runs once (in any order); a combine needs its
dispatch received (its hook run). Every rank must make the same calls in the same order.

`use_logfmt=True` sends the partial sums as LogFMT-10 (src/core/logfmt.hpp; within DeepEP's
calc_diff < 9e-4, tested on 2 and 4 GPUs); FLASHEP_DEBUG_LL_LOGFMT=0 sends exact BF16 instead.
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import _C
from .utils import DeviceMemory, EventOverlap, check_aligned, check_int, check_tensor, topk_idx_t

# The outputs made in C++ through ATen (python/src/torch_outputs.cpp; ~3x less host time than
# torch.empty and views from here). Absent when flashep was built without torch in its build
# environment (an isolated `pip install .`); it then fails to import, and the same tensors are made
# here. OUTPUTS_IN_CPP says which; OUTPUTS_IMPORT_ERROR says why not.
try:
    from . import _torch_outputs as _outputs
    OUTPUTS_IMPORT_ERROR: Optional[BaseException] = None
except ImportError as _error:  # not built, or built against another torch
    _outputs = None
    OUTPUTS_IMPORT_ERROR = _error
    if importlib.util.find_spec(f"{__package__}._torch_outputs") is not None:  # built, but does not import
        warnings.warn(f"flashep: flashep._torch_outputs does not import ({_error}); the low-latency outputs are "
                      "made from Python (more host time per call). Rebuild flashep against this torch.")
OUTPUTS_IN_CPP = _outputs is not None


class LowLatencyHandle(tuple):
    """DeepEP's low-latency handle `(src_info, layout_range, T, H, E)`, a tuple, plus what flashep's
    combine needs: the combine plan tensor, the top-k width and the id of the buffer that made it."""

    plan: torch.Tensor  # the int32 words that hold recv_count, src_info, the plan and layout_range
    num_topk: int
    buffer_id: int
    shape_key: tuple
    pending_call: Optional[int]  # the hooked dispatch that fills it, until its hook has run

    def __new__(cls, src_info: torch.Tensor, layout_range: torch.Tensor, max_tokens: int, hidden: int,
                num_experts: int, plan: torch.Tensor, num_topk: int, buffer_id: int) -> "LowLatencyHandle":
        handle = super().__new__(cls, (src_info, layout_range, max_tokens, hidden, num_experts))
        handle.plan = plan
        handle.num_topk = num_topk
        handle.buffer_id = buffer_id
        handle.pending_call = None
        return handle


class _DispatchShape:
    """A checked dispatch configuration and its derived sizes. The int32 outputs share one
    allocation: recv_count [L], src_info [L, R*T], the combine plan, then layout_range int64 [L, R]."""

    def __init__(self, buffer: "LowLatencyMixin", max_tokens: Any, num_experts: Any, hidden: int, num_topk: int,
                 use_fp8: bool, round_scale: bool, use_ue8m0: bool):
        buffer._require_low_latency("low_latency_dispatch")
        R = buffer.group_size
        self.max_tokens = check_int("num_max_dispatch_tokens_per_rank", max_tokens, minimum=1)
        self.num_experts = buffer._check_num_experts(num_experts)
        if hidden == 0 or hidden % 128 != 0:
            raise ValueError(f"hidden must be a positive multiple of 128, got {hidden}")
        if not 1 <= num_topk <= _C.kMaxTopk:
            raise ValueError(f"topk_idx has {num_topk} columns; top-k must be in [1, {_C.kMaxTopk}]")
        if use_ue8m0 and not (use_fp8 and round_scale):
            raise ValueError("use_ue8m0 requires use_fp8=True and round_scale=True")
        if use_ue8m0 and hidden % 512 != 0:
            raise ValueError(f"use_ue8m0 needs hidden % 512 == 0, got {hidden}")
        # The C++ core checks T, H and E against its limits and the buffer size (raises ValueError).
        needed = _C.low_latency_region_bytes_hint(self.max_tokens, hidden, R, self.num_experts)
        if needed > buffer.num_rdma_bytes:
            raise ValueError(f"(T={self.max_tokens}, H={hidden}, R={R}, E={self.num_experts}) needs num_rdma_bytes >= "
                             f"{needed} but the Buffer has {buffer.num_rdma_bytes}; size it with "
                             "get_low_latency_rdma_size_hint(T, H, R, E)")
        self.key = (max_tokens, num_experts, hidden, num_topk, bool(use_fp8), bool(round_scale), bool(use_ue8m0))
        self.hidden, self.num_topk = hidden, num_topk
        self.use_fp8, self.round_scale, self.use_ue8m0 = bool(use_fp8), bool(round_scale), bool(use_ue8m0)
        self.device = buffer._device
        L = self.num_local = self.num_experts // R
        self.num_ranks = R
        rows = self.rows = R * self.max_tokens
        plan_ints = _C.low_latency_plan_ints(R, self.max_tokens, num_topk)
        ints = L + L * rows + plan_ints
        ints += ints % 2  # layout_range (int64) after them, 8-byte aligned
        self.ints, self.longs = ints, L * R
        self.src_info_offset = 4 * L
        self.plan_offset = 4 * (L + L * rows)
        self.layout_range_offset = 4 * ints
        self.combine_x_shape = (L, rows, hidden)
        self.x_dtype = torch.float8_e4m3fn if use_fp8 else torch.bfloat16
        self.device_index = buffer._device_index
        # Scales: 0 none (BF16), 1 float32 per 128 channels, 2 int32 of four UE8M0 bytes per 512.
        self.scale_kind = 0 if not use_fp8 else (2 if use_ue8m0 else 1)
        self.scale_groups = 0 if not use_fp8 else hidden // (512 if use_ue8m0 else 128)

    def allocate(self) -> tuple:
        """New outputs: (recv_x, recv_scales or None, words, recv_count, src_info, layout_range, and
        the addresses of recv_x, recv_scales (0 without) and words)."""
        L, rows, H = self.num_local, self.rows, self.hidden
        if _outputs is not None:
            return _outputs.dispatch_outputs(self.device_index, L, rows, H, int(self.use_fp8), self.scale_kind,
                                             self.scale_groups, self.ints // 2 + self.longs, self.ints, self.num_ranks)
        dev = self.device
        recv_x = torch.empty((L, rows, H), dtype=self.x_dtype, device=dev)
        recv_scales = None
        if self.scale_kind:
            recv_scales = torch.empty((L, self.scale_groups, rows), dtype=torch.float32 if self.scale_kind == 1 else torch.int32,
                                      device=dev).transpose(1, 2)
        words = torch.empty((self.ints // 2 + self.longs,), dtype=torch.int64, device=dev)
        ints = words.view(torch.int32)
        recv_count = ints.as_strided((L,), (1,), 0)
        src_info = ints.as_strided((L, rows), (rows, 1), L)
        layout_range = words.as_strided((L, self.num_ranks), (self.num_ranks, 1), self.ints // 2)
        return (recv_x, recv_scales, words, recv_count, src_info, layout_range, recv_x.data_ptr(),
                0 if recv_scales is None else recv_scales.data_ptr(), words.data_ptr())


_NO_EVENT = EventOverlap(None)

# Codes of _ll_fast (and flashep._torch_outputs.check_tensors): dtype | rank << 4.
# What check_tensors takes as a plain tensor (torch's THPVariable_CheckExact): Tensor and Parameter.
_EXACT_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)
_CODE_DTYPES = {1: torch.bfloat16, 2: torch.int64, 3: torch.float32, 4: torch.int32}
_BF16_2D, _BF16_3D, _INT64_2D, _FLOAT32_2D = 1 | 2 << 4, 1 | 3 << 4, 2 | 2 << 4, 3 | 2 << 4


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

    def _ll_begin_send(self, hooked: bool, layout: tuple) -> Tuple[Optional[int], int]:
        """Before a send phase: refuses a third call in flight (the buffer has two halves) and a call
        whose region layout (T, H, E) differs from a call still waiting for its hook (the areas of
        one layout overlap the other's); registers a hooked call. Returns (its id or None, the call
        slot of both its phases)."""
        state = self._ll_state()
        if len(state["pending"]) >= 2:
            raise RuntimeError("flashep: two low-latency calls are waiting for their hooks; call a hook before "
                               "another low-latency call (the buffer holds two calls' data at most)")
        layouts = state.setdefault("layouts", {})
        for other in state["pending"]:
            if layouts.get(other, layout) != layout:
                raise ValueError(f"flashep: a low-latency call with (T, H, E) = {layouts[other]} is waiting for its hook; "
                                 f"a call with {layout} would overwrite its data: run that hook first")
        call_id = state["next_id"]
        state["next_id"] += 1
        if hooked:
            state["pending"].append(call_id)
            layouts[call_id] = layout
        return (call_id if hooked else None), call_id % _C.kLowLatencyCallSlots

    def _ll_forget(self, call_id: Optional[int]) -> None:
        """A send that failed to launch holds no slot."""
        if call_id is not None and call_id in self._ll_state()["pending"]:
            self._ll_state()["pending"].remove(call_id)
            self._ll_state().get("layouts", {}).pop(call_id, None)

    def _ll_hook(self, call_id: int, launch: Callable[[], None]) -> Callable[[], None]:
        def hook() -> None:
            pending = self._ll_state()["pending"]
            if call_id not in pending:
                raise RuntimeError("flashep: this low-latency hook has run already")
            launch()
            pending.remove(call_id)
            self._ll_state().get("layouts", {}).pop(call_id, None)
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


    # ---- fast checks (host time matters at decode sizes) ---------------------------------------------

    def _ll_fast(self, *tensors_and_codes: Any) -> Optional[tuple]:
        """The common case of the input checks, (tensor, code) pairs (code = dtype | rank << 4: _BF16_2D,
        ...): each exactly a torch.Tensor (or Parameter) of that dtype and rank on this device, contiguous and 16-byte
        aligned. Returns (address, *sizes) of each, concatenated, or None when any is not (the caller
        then runs the full checks, which name what is wrong). In C++ when flashep._torch_outputs is
        there (~0.5 us against ~1-2 us per tensor here)."""
        if _outputs is not None:
            return _outputs.check_tensors(self._device_index, *tensors_and_codes)
        found: List[int] = []
        for tensor, code in zip(tensors_and_codes[0::2], tensors_and_codes[1::2]):
            if not (type(tensor) in _EXACT_TENSOR_TYPES and tensor.dtype is _CODE_DTYPES[code & 15] and tensor.is_cuda
                    and tensor.get_device() == self._device_index and tensor.dim() == code >> 4
                    and tensor.is_contiguous() and tensor.data_ptr() % 16 == 0):
                return None
            found.append(tensor.data_ptr())
            found.extend(tensor.shape)
        return tuple(found)

    def _ll_shape(self, max_tokens: Any, num_experts: Any, hidden: int, num_topk: int, use_fp8: bool,
                  round_scale: bool, use_ue8m0: bool) -> "_DispatchShape":
        """The checked, derived sizes of a dispatch configuration (cached: checked once)."""
        key = (max_tokens, num_experts, hidden, num_topk, bool(use_fp8), bool(round_scale), bool(use_ue8m0))
        cache = self._ll_state().setdefault("shapes", {})
        shape = cache.get(key)
        if shape is None:
            shape = _DispatchShape(self, *key)
            cache[key] = shape
        return shape

    # ---- dispatch ----------------------------------------------------------------------------------

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False) -> Tuple[Any, torch.Tensor, LowLatencyHandle, EventOverlap, Any]:
        """Returns (recv_x, recv_count, handle, event, hook); recv_x is (fp8 [L, R*T, H], scales) with
        FP8, else bf16 [L, R*T, H]. See the module docstring for streams and the hook."""
        fast = self._ll_fast(x, _BF16_2D, topk_idx, _INT64_2D)
        if fast is None:
            self._require_low_latency("low_latency_dispatch")
            check_tensor("x", x, torch.bfloat16, self._device, (None, None))
            check_aligned("x", x)
            self._check_topk_idx(topk_idx, x.size(0))
            check_aligned("topk_idx", topk_idx, 8)
            fast = (x.data_ptr(), *x.shape, topk_idx.data_ptr(), *topk_idx.shape)
        x_at, num_tokens, hidden, idx_at, idx_rows, num_topk = fast
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook exclude each other")
        shape = self._ll_shape(num_max_dispatch_tokens_per_rank, num_experts, hidden, num_topk, use_fp8,
                               round_scale, use_ue8m0)
        if idx_rows != num_tokens:
            raise ValueError(f"topk_idx has {idx_rows} rows but x has {num_tokens} tokens")
        if num_tokens > shape.max_tokens:
            raise ValueError(f"x has {num_tokens} tokens but num_max_dispatch_tokens_per_rank is {shape.max_tokens}")
        recv_stats = self._ll_check_stats("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats,
                                          torch.int32, shape.num_local)
        wait_stats = self._ll_check_stats("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats,
                                          torch.int64, self.group_size)
        if self._check_inputs:
            self._check_topk_values(topk_idx, shape.num_experts)
        runtime = self._rt()

        if async_finish:
            stream = self._comm_stream
            stream.wait_stream(torch.cuda.current_stream(self._device))
            with torch.cuda.stream(stream):
                outputs = shape.allocate()
            raw_stream = stream.cuda_stream
        else:
            stream = None
            outputs = shape.allocate()
            raw_stream = torch._C._cuda_getCurrentRawStream(self._device_index)
        recv_x, recv_scales, words, recv_count, src_info, layout_range, recv_x_at, scales_at, base = outputs
        args = (x_at, idx_at, num_tokens, hidden, shape.num_topk, shape.max_tokens,
                shape.num_experts, shape.use_fp8, shape.round_scale, shape.use_ue8m0)
        outs = (recv_x_at, scales_at, base,
                0 if recv_stats is None else recv_stats.data_ptr(), 0 if wait_stats is None else wait_stats.data_ptr(),
                base + shape.src_info_offset, base + shape.layout_range_offset, base + shape.plan_offset)
        event, hook, call_id = self._ll_launch(_C.ll_dispatch, args, args, outs, return_recv_hook, stream, raw_stream,
                                               (x, topk_idx, recv_x, recv_scales, words, recv_stats, wait_stats),
                                               (shape.max_tokens, hidden, shape.num_experts))
        # The handle after the launch: in a loop of calls the host time before the launch is GPU idle time.
        handle = LowLatencyHandle(src_info, layout_range, shape.max_tokens, hidden, shape.num_experts, words,
                                  shape.num_topk, runtime.id)
        handle.shape_key = shape.key
        handle.pending_call = call_id
        return ((recv_x, recv_scales) if shape.use_fp8 else recv_x), recv_count, handle, event, hook

    def _ll_launch(self, kernel: Callable[..., None], send_args: Tuple[Any, ...], receive_args: Tuple[Any, ...],
                   tail: Tuple[Any, ...], return_recv_hook: bool, stream: Optional[torch.cuda.Stream], raw_stream: int,
                   kept: Tuple[Any, ...], layout: tuple) -> Tuple[EventOverlap, Any, Optional[int]]:
        """Launches a low-latency call, `kernel(runtime, *args, phases, call_slot, *tail, stream)`:
        both phases now, or the send phase now and the receive phase in the returned hook (which
        keeps `kept` alive until it runs). Returns (event, hook, the hooked call's id or None)."""
        runtime = self._rt()
        call_id, slot = self._ll_begin_send(return_recv_hook, layout)
        try:
            kernel(runtime, *send_args, _C.kLowLatencySend if return_recv_hook else _C.kLowLatencyBoth, slot, *tail,
                   raw_stream)
        except BaseException:
            self._ll_forget(call_id)
            raise
        hook = None
        if return_recv_hook:
            kept_alive: List[Any] = list(kept)

            def receive() -> None:
                kernel(runtime, *receive_args, _C.kLowLatencyReceive, slot, *tail,
                       torch._C._cuda_getCurrentRawStream(self._device_index))
                del kept_alive[:]
            hook = self._ll_hook(call_id, receive)
        event = _NO_EVENT if stream is None else self._ll_finish(stream, kept)
        return event, hook, call_id

    def _ll_finish(self, stream: torch.cuda.Stream, kept: Tuple[Any, ...]) -> EventOverlap:
        tensors = tuple(t for t in kept if isinstance(t, torch.Tensor))
        for tensor in tensors:
            tensor.record_stream(stream)
        return EventOverlap(stream.record_event(), extra_tensors=tensors)

    # ---- combine -----------------------------------------------------------------------------------

    def _ll_new_out(self, num_tokens: int, hidden: int) -> Tuple[torch.Tensor, int]:
        """The combine's output, bf16 [num_tokens, hidden], and its address."""
        if _outputs is not None:
            return _outputs.bf16_2d(self._device_index, num_tokens, hidden)
        out = torch.empty((num_tokens, hidden), dtype=torch.bfloat16, device=self._device)
        return out, out.data_ptr()

    def _ll_check_handle(self, handle: Any) -> LowLatencyHandle:
        if not isinstance(handle, LowLatencyHandle):
            raise ValueError("handle must be the one returned by low_latency_dispatch")
        if handle.buffer_id != self._rt().id:
            raise ValueError("handle was made by another Buffer")
        if handle.pending_call is not None and handle.pending_call in self._ll_state()["pending"]:
            raise RuntimeError("flashep: the dispatch that made this handle has not received yet; call its hook first")
        return handle

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: Any, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False,
                            out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, EventOverlap, Any]:
        """Returns (combined_x bf16 [n, H], event, hook): combined_x[t] = sum over k of
        topk_weights[t, k] * (expert output of topk_idx[t, k] for t)."""
        handle = self._ll_check_handle(handle)
        src_info, layout_range, max_tokens, hidden, num_experts = handle
        shape = self._ll_state()["shapes"][handle.shape_key]
        num_ranks = self.group_size
        fast = self._ll_fast(x, _BF16_3D, topk_idx, _INT64_2D, topk_weights, _FLOAT32_2D)
        if fast is None or fast[1:4] != shape.combine_x_shape or fast[8:10] != fast[5:7]:
            self._require_low_latency("low_latency_combine")
            check_tensor("x", x, torch.bfloat16, self._device, shape.combine_x_shape)
            check_aligned("x", x)
            self._check_topk_idx(topk_idx)
            check_tensor("topk_weights", topk_weights, torch.float32, self._device, tuple(topk_idx.shape))
            fast = (x.data_ptr(), *x.shape, topk_idx.data_ptr(), *topk_idx.shape, topk_weights.data_ptr(),
                    *topk_weights.shape)
        x_at, idx_at, num_tokens, num_topk, weights_at = fast[0], fast[4], fast[5], fast[6], fast[7]
        if num_topk != handle.num_topk:
            raise ValueError(f"topk_idx has {num_topk} columns but the dispatch had {handle.num_topk}")
        if num_tokens > max_tokens:
            raise ValueError(f"topk_idx has {num_tokens} tokens but the dispatch's T is {max_tokens}")
        if out is not None:
            fast = self._ll_fast(out, _BF16_2D)
            if fast is None or fast[1:3] != (num_tokens, hidden):
                check_tensor("out", out, torch.bfloat16, self._device, (num_tokens, hidden))
                check_aligned("out", out)
                fast = (out.data_ptr(),)
            out_at = fast[0]
        wait_stats = self._ll_check_stats("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats,
                                          torch.int64, num_ranks)

        if async_finish:
            stream = self._comm_stream
            stream.wait_stream(torch.cuda.current_stream(self._device))
            if out is None:
                with torch.cuda.stream(stream):
                    out, out_at = self._ll_new_out(num_tokens, hidden)
            raw_stream = stream.cuda_stream
        else:
            stream = None
            if out is None:
                out, out_at = self._ll_new_out(num_tokens, hidden)
            raw_stream = torch._C._cuda_getCurrentRawStream(self._device_index)
        base = handle.plan.data_ptr()
        args = (x_at, bool(zero_copy), bool(use_logfmt), idx_at, weights_at, num_tokens,
                base + shape.src_info_offset, base + shape.layout_range_offset, base + shape.plan_offset, max_tokens,
                hidden, num_experts, num_topk)
        tail = (out_at, 0 if wait_stats is None else wait_stats.data_ptr())
        receive_args = (x_at, False) + args[2:]  # the receive phase reads no x
        event, hook, _ = self._ll_launch(_C.ll_combine, args, receive_args, tail, return_recv_hook, stream, raw_stream,
                                         (x, topk_idx, topk_weights, out, handle.plan, wait_stats),
                                         (handle[2], handle[3], handle[4]))  # (T, H, E) of its dispatch
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
        self._ll_state().get("layouts", {}).clear()

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
