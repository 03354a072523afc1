"""flashep.Buffer: DeepEP V1's `deep_ep.Buffer`, same names, defaults, shapes and semantics.

Implemented now: one NVLink domain ("single node") high-throughput path, i.e. get_dispatch_layout,
dispatch (BF16 or FP8 with scales, normal / worst-case / cached) and combine, and the low-latency
mode (flashep/low_latency.py) over NVLink stores and NVSHMEM. A high-throughput buffer whose ranks
span several NVLink domains runs the multi-node path of flashep/internode.py (a first version
composed of stages: a rail stage over NVSHMEM, this module's single-node dispatch inside each node,
a reordering; written 2026-11-30, tested on 2 GPUs as 2 nodes of 1).

Errors: bad arguments raise ValueError/TypeError here or from the C++ core, before anything runs;
runtime failures raise a FlashepError subclass (FlashepTimeoutError, FlashepPeerMismatchError,
FlashepPeerFailedError, FlashepDeviceFaultError, FlashepPoisonedError; FlashepUnsupportedError is a
NotImplementedError too). After a runtime failure the Buffer is poisoned on every rank: destroy it
and create a new one.

Streams: every call runs its kernels on the Buffer's communication stream, which first waits on
`previous_event` when given, else on the current stream. With `async_finish=True` the call returns
an EventOverlap recorded on the communication stream that keeps inputs and outputs alive; otherwise
the current stream waits for the communication stream before the call returns. Outputs are
allocated on the current stream, or on the communication stream with `allocate_on_comm_stream=True`
(which requires `previous_event` and `async_finish`).

Arguments are checked here, before anything reaches the C++ core; errors name the argument.
Importing this module requires torch (flashep._C and flashep.env do not).
"""
from __future__ import annotations

from typing import Any, Callable, List, NamedTuple, Optional, Tuple, Union

import torch
import torch.distributed as dist

from . import _C, env
from .internode import InternodeMixin
from .low_latency import LowLatencyHandle, LowLatencyMixin
from .utils import (
    DeviceMemory,
    EventOverlap,
    check_aligned,
    check_int,
    check_tensor,
    check_topk_values,
    event_of,
    iter_tensors,
    topk_idx_t,
)

Config = _C.Config

__all__ = ["Buffer", "Config", "EventOverlap", "LowLatencyHandle", "topk_idx_t"]

_MAX_TOPK = _C.kMaxTopk
_MAX_LOCAL_EXPERTS = _C.kMaxLocalExperts
_DEFAULT_NVL_DOMAIN = 8


class _Payload(NamedTuple):
    """The checked `x` of a dispatch: data [n, H] (bf16 or fp8) and fp8 scales [n, H/128] or None."""

    data: torch.Tensor
    scales: Optional[torch.Tensor]

    @property
    def num_tokens(self) -> int:
        return self.data.size(0)

    @property
    def hidden(self) -> int:
        return self.data.size(1)

    @property
    def hidden_bytes(self) -> int:
        return self.hidden * max(self.data.element_size(), 2)

    @property
    def dtype(self) -> Any:
        return _C.DType.bfloat16 if self.scales is None else _C.DType.float8_e4m3


class _Handle(NamedTuple):
    """The single-node dispatch handle (DeepEP's tuple order)."""

    rank_prefix_matrix: torch.Tensor
    channel_prefix_matrix: torch.Tensor
    recv_channel_prefix_matrix: torch.Tensor
    recv_src_idx: torch.Tensor
    is_token_in_rank: torch.Tensor
    send_head: torch.Tensor


class _Launch:
    """Stream bookkeeping shared by every operation: the prologue (checks, comm stream waits) at
    construction, output allocation on the right stream, and the epilogue in finish()."""

    def __init__(self, buffer: "Buffer", previous_event: Any, async_finish: bool, allocate_on_comm_stream: bool):
        if allocate_on_comm_stream and (previous_event is None or not async_finish):
            raise ValueError("allocate_on_comm_stream=True requires previous_event and async_finish=True")
        event = event_of(previous_event)
        self.device = buffer._device
        self.compute = torch.cuda.current_stream(self.device)
        self.comm = buffer._comm_stream
        self.async_finish = bool(async_finish)
        self.allocate_on_comm = bool(allocate_on_comm_stream)
        self.outputs: List[torch.Tensor] = []
        if event is not None:
            self.comm.wait_event(event)
        else:
            self.comm.wait_stream(self.compute)

    @property
    def stream(self) -> int:
        """The communication stream as the int the C++ core takes."""
        return self.comm.cuda_stream

    def empty(self, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized output, allocated on the stream the caller asked for."""
        if self.allocate_on_comm:
            with torch.cuda.stream(self.comm):
                tensor = torch.empty(shape, dtype=dtype, device=self.device)
        else:
            tensor = torch.empty(shape, dtype=dtype, device=self.device)
        self.outputs.append(tensor)
        return tensor

    def finish(self, *inputs: Any) -> EventOverlap:
        """Epilogue: an event on the comm stream (async) or the current stream waiting for it."""
        if self.allocate_on_comm:
            for tensor in self.outputs:
                tensor.record_stream(self.compute)
        if not self.async_finish:
            self.compute.wait_stream(self.comm)
            return EventOverlap(None)
        event = self.comm.record_event()
        kept = list(iter_tensors(inputs))
        # Tensors allocated on the compute stream that the comm stream still uses.
        for tensor in kept if self.allocate_on_comm else kept + self.outputs:
            tensor.record_stream(self.comm)
        return EventOverlap(event, extra_tensors=tuple(kept + self.outputs))


def _failure(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _ptr(tensor: Optional[torch.Tensor]) -> int:
    return 0 if tensor is None else tensor.data_ptr()


class Buffer(LowLatencyMixin, InternodeMixin):
    """The expert-parallel communication buffer of one rank (DeepEP V1 `deep_ep.Buffer`).

    Construction is collective over `group`: every rank allocates its NVLink buffer and the ranks
    exchange CUDA IPC handles through torch.distributed.all_gather_object.
    """

    #: SMs the high-throughput kernels occupy with the default configs (set_num_sms changes it).
    num_sms: int = 20

    def __init__(
        self,
        group: Optional[dist.ProcessGroup],
        num_nvl_bytes: int = 0,
        num_rdma_bytes: int = 0,
        low_latency_mode: bool = False,
        num_qps_per_rank: int = 24,
        allow_nvlink_for_low_latency_mode: bool = True,
        allow_mnnvl: bool = False,
        use_fabric: bool = False,
        explicitly_destroy: bool = False,
        enable_shrink: bool = False,
        nvl_domain_size: Optional[int] = None,
    ) -> None:
        self.runtime: Optional[_C.Runtime] = None
        self.explicitly_destroy = bool(explicitly_destroy)
        self.low_latency_mode = bool(low_latency_mode)
        self.allow_nvlink_for_low_latency_mode = bool(allow_nvlink_for_low_latency_mode)
        self.enable_shrink = bool(enable_shrink)
        # num_qps_per_rank: RDMA queue pairs per peer in DeepEP; NVSHMEM chooses its own here.
        self.num_qps_per_rank = check_int("num_qps_per_rank", num_qps_per_rank, minimum=1)
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.group_size = dist.get_world_size(self.group)
        self.num_nvl_bytes = check_int("num_nvl_bytes", num_nvl_bytes, minimum=0)
        # The low-latency region in low-latency mode; the RDMA rings of the multi-node mode otherwise.
        self.num_rdma_bytes = check_int("num_rdma_bytes", num_rdma_bytes, minimum=0)
        # flashep extension (after DeepEP's arguments): ranks per NVLink domain, e.g. 1 to run two
        # GPUs of one host as two "nodes"; None: FLASHEP_NVL_DOMAIN_SIZE, else min(group size, 8).
        self.nvl_domain_size = self._resolve_nvl_domain_size(self.group_size, nvl_domain_size)
        self._check_inputs = env.check_inputs()
        self._device = torch.device("cuda", torch.cuda.current_device())
        self._device_index = self._device.index
        self._comm_stream = torch.cuda.Stream(device=self._device)
        self.runtime = self._create_runtime()

    @staticmethod
    def _resolve_nvl_domain_size(group_size: int, requested: Optional[int] = None) -> int:
        """Ranks per NVLink domain: FLASHEP_NVL_DOMAIN_SIZE, else min(group size, 8). A size below the
        group size makes the buffer multi-node (flashep/internode.py)."""
        if requested is not None:
            requested = check_int("nvl_domain_size", requested, minimum=1)
        requested = requested or env.nvl_domain_size() or min(group_size, _DEFAULT_NVL_DOMAIN)
        if requested >= group_size:
            return group_size
        if group_size % requested != 0:
            raise ValueError(f"nvl_domain_size {requested} (argument or FLASHEP_NVL_DOMAIN_SIZE) must divide the "
                             f"group size {group_size}")
        return requested

    def _all_gather(self, payload: Any) -> List[Any]:
        gathered: List[Any] = [None] * self.group_size
        dist.all_gather_object(gathered, payload, group=self.group)
        return gathered

    def _create_runtime(self) -> "_C.Runtime":
        """Collective: create the C++ runtime and run its bootstrap rounds (each an all-gather of
        every rank's message). A failure on any rank, in any round, is reported on every rank (no rank
        is left waiting in an exchange)."""
        runtime, payload = None, None
        try:
            runtime = _C.Runtime(self.rank, self.group_size, self.nvl_domain_size, self.num_nvl_bytes,
                                 self.num_rdma_bytes, self._device.index, env.timeout_s(),
                                 env.debug_initial_counter(), low_latency_mode=self.low_latency_mode,
                                 allow_nvlink_for_low_latency=self.allow_nvlink_for_low_latency_mode,
                                 enable_shrink=self.enable_shrink)
            payload = runtime.bootstrap_message()
        except Exception as error:  # reported to every rank below
            payload = error
        done = False
        while True:
            # Each round gathers every rank's message, or its failure; after the last round one more
            # gather tells every rank that all of them are through (a rank that failed in the last
            # step must not leave the others believing the buffer works).
            if done and isinstance(payload, bytes):
                payload = b"connected"
            gathered = self._all_gather(payload if isinstance(payload, bytes) else _failure(payload))
            failures = [f"rank {r}: {p}" for r, p in enumerate(gathered) if not isinstance(p, bytes)]
            if failures:
                if runtime is not None:
                    runtime.destroy()
                if isinstance(payload, BaseException):
                    raise payload
                raise RuntimeError("flashep: Buffer construction failed on other ranks; " + "; ".join(failures))
            if done:
                return runtime
            try:
                done = runtime.bootstrap_receive(gathered)
                if not done:
                    payload = runtime.bootstrap_message()
            except Exception as error:  # the next gather tells the other ranks
                payload = error

    # ---- configuration -----------------------------------------------------------------------------

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Sets the SM count of the default dispatch/combine configs (must be even)."""
        new_num_sms = check_int("new_num_sms", new_num_sms, minimum=2)
        if new_num_sms % 2 != 0:
            raise ValueError(f"the SM count must be even, got {new_num_sms}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def is_sm90_compiled() -> bool:
        return True

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        return _C.default_dispatch_config(check_int("num_ranks", num_ranks, minimum=1), Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        return _C.default_combine_config(check_int("num_ranks", num_ranks, minimum=1), Buffer.num_sms)

    @staticmethod
    def capture() -> EventOverlap:
        """An EventOverlap recorded on the current stream (for `previous_event`)."""
        return EventOverlap(torch.cuda.current_stream().record_event())

    # ---- resources ---------------------------------------------------------------------------------

    def _rt(self) -> "_C.Runtime":
        if self.runtime is None:
            raise RuntimeError("flashep: this Buffer has been destroyed")
        return self.runtime

    def get_comm_stream(self) -> torch.cuda.Stream:
        return self._comm_stream

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size] = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """A tensor view (no copy) of this rank's NVLink buffer from byte `offset`, of `dtype`,
        1-D over the rest of the buffer or shaped `size`."""
        if use_rdma_buffer:
            raise NotImplementedError("flashep: the RDMA buffer is not implemented yet (single node only)")
        runtime = self._rt()
        offset = check_int("offset", offset, minimum=0, maximum=self.num_nvl_bytes)
        itemsize = torch.empty((), dtype=dtype, device="cpu").element_size()
        nbytes = (self.num_nvl_bytes - offset) // itemsize * itemsize
        memory = DeviceMemory(runtime.local_nvl_buffer + offset, nbytes)
        tensor = torch.as_tensor(memory, device=self._device).view(dtype)
        if size is None:
            return tensor
        size = torch.Size(size)
        if size.numel() > tensor.numel():
            raise ValueError(f"size {list(size)} needs {size.numel() * itemsize} bytes but only {nbytes} "
                             f"remain after offset {offset}")
        return tensor[: size.numel()].view(size)

    def check_transports(self, bytes_per_peer: int = 1 << 20) -> List[Tuple[int, str, int]]:
        """flashep extension (collective): every rank sends `bytes_per_peer` bytes of a pattern to
        every peer through the transport chosen for it ('nvlink': CUDA IPC stores; 'nvshmem': NVSHMEM
        puts and signals), waits for the peers' (bounded) and checks what arrived. Returns (peer,
        transport, mismatched 32-bit words) per peer. No other operation may be in flight."""
        bytes_per_peer = check_int("bytes_per_peer", bytes_per_peer, minimum=16)
        torch.cuda.synchronize(self._device)
        return [tuple(item) for item in self._rt().check_transports(bytes_per_peer)]

    def destroy(self) -> None:
        """Frees the buffer (Buffer(..., explicitly_destroy=True) only). Collective: every rank calls
        it; it waits for this device and for the other ranks first. Idempotent."""
        if not self.explicitly_destroy:
            raise RuntimeError("flashep: destroy() requires Buffer(..., explicitly_destroy=True); "
                               "otherwise the buffer is freed when it is deleted")
        if self.runtime is None:
            return
        torch.cuda.synchronize(self._device)
        if dist.is_initialized():
            dist.barrier(group=self.group)
        self.runtime.destroy(collective=True)
        self.runtime = None

    def __del__(self) -> None:
        runtime = getattr(self, "runtime", None)
        if runtime is None or getattr(self, "explicitly_destroy", True):
            return
        try:
            runtime.destroy()
        except Exception:
            pass
        self.runtime = None

    # ---- argument checks (no C++ call launches anything here) --------------------------------------

    def _config(self, config: Optional[Config], default: Callable[[int], Config]) -> Config:
        if config is None:
            config = default(self.group_size)
        if not isinstance(config, Config):
            raise TypeError(f"config must be a flashep.Config, got {type(config).__name__}")
        if config.num_sms < 2 or config.num_sms % 2 != 0:
            raise ValueError(f"config.num_sms must be even and >= 2, got {config.num_sms}")
        config.validate()
        return config

    def _check_buffer_size(self, config: Config, hidden_bytes: int) -> None:
        # The rings serve the NVLink domain (the whole group on one node).
        needed = config.get_nvl_buffer_size_hint(hidden_bytes, self.nvl_domain_size)
        if needed > self.num_nvl_bytes:
            raise RuntimeError(
                f"flashep: this call needs num_nvl_bytes >= {needed} (hidden_bytes={hidden_bytes}, "
                f"NVLink domains of {self.nvl_domain_size} ranks, {config}) but the Buffer has {self.num_nvl_bytes}; "
                "size it with config.get_nvl_buffer_size_hint(hidden_bytes, num_ranks)")

    def _check_num_experts(self, num_experts: Any, name: str = "num_experts") -> int:
        num_experts = check_int(name, num_experts, minimum=1)
        if num_experts % self.group_size != 0:
            raise ValueError(f"{name}={num_experts} must be a multiple of the number of ranks {self.group_size}")
        if num_experts // self.group_size > _MAX_LOCAL_EXPERTS:
            raise ValueError(f"{name}={num_experts} gives {num_experts // self.group_size} experts per rank; "
                             f"at most {_MAX_LOCAL_EXPERTS} are supported")
        return num_experts

    def _check_topk_idx(self, topk_idx: Any, num_tokens: Optional[int] = None) -> int:
        """Checks topk_idx [n, K] (int64, contiguous, 1 <= K <= kMaxTopk); returns K."""
        check_tensor("topk_idx", topk_idx, topk_idx_t, self._device, (num_tokens, None))
        num_topk = topk_idx.size(1)
        if not 1 <= num_topk <= _MAX_TOPK:
            raise ValueError(f"topk_idx has {num_topk} columns; top-k must be in [1, {_MAX_TOPK}]")
        return num_topk

    def _check_topk_values(self, topk_idx: torch.Tensor, num_experts: int) -> None:
        if self._check_inputs:
            check_topk_values("topk_idx", topk_idx, num_experts)

    def _check_payload(self, x: Any) -> _Payload:
        """x: bf16 [n, H] or (fp8 e4m3fn [n, H], float32 scales [n, H/128] of any strides)."""
        if isinstance(x, (tuple, list)):
            if len(x) != 2:
                raise ValueError(f"x as a tuple must be (fp8 data, float32 scales), got {len(x)} items")
            data = check_tensor("x[0]", x[0], torch.float8_e4m3fn, self._device, (None, None))
            if data.size(1) == 0 or data.size(1) % 128 != 0:
                raise ValueError(f"FP8 x needs a hidden size that is a multiple of 128, got {data.size(1)}")
            scales = check_tensor("x[1] (scales)", x[1], torch.float32, self._device,
                                  (data.size(0), data.size(1) // 128), contiguous=False)
            check_aligned("x[0]", data)
            check_aligned("x[1] (scales)", scales, 4)
            return _Payload(data, scales)
        data = check_tensor("x", x, torch.bfloat16, self._device, (None, None))
        if data.size(1) == 0 or data.size(1) * data.element_size() % 16 != 0:
            raise ValueError(f"x rows must be a multiple of 16 bytes, got hidden={data.size(1)}")
        check_aligned("x", data)
        return _Payload(data, None)

    def _check_handle(self, handle: Any, config: Config, num_tokens: Optional[int] = None) -> _Handle:
        if not isinstance(handle, (tuple, list)) or len(handle) != len(_Handle._fields):
            raise ValueError("handle must be the 6-tuple returned by a single-node dispatch")
        num_ranks, num_channels = self.group_size, self._rt().num_channels(config)
        for index, name in ((1, "channel_prefix_matrix"), (2, "recv_channel_prefix_matrix")):
            tensor = handle[index]
            if isinstance(tensor, torch.Tensor) and tensor.dim() == 2 and tensor.size(1) != num_channels:
                raise ValueError(
                    f"handle[{index}] ({name}) has {tensor.size(1)} channels but config.num_sms="
                    f"{config.num_sms} gives {num_channels}; use the num_sms of the dispatch that made the handle")
        checks = (
            (torch.int32, (num_ranks, num_ranks)),
            (torch.int32, (num_ranks, num_channels)),
            (torch.int32, (num_ranks, num_channels)),
            (torch.int32, (None,)),
            (torch.bool, (num_tokens, num_ranks)),
            (torch.int32, (num_tokens, num_ranks)),
        )
        for index, (name, (dtype, shape)) in enumerate(zip(_Handle._fields, checks)):
            check_tensor(f"handle[{index}] ({name})", handle[index], dtype, self._device, shape)
        parts = _Handle(*handle)
        if parts.send_head.size(0) != parts.is_token_in_rank.size(0):
            raise ValueError("handle[5] (send_head) and handle[4] (is_token_in_rank) disagree on the token count")
        return parts

    def _check_bias(self, bias: Any, num_tokens: int, hidden: int) -> Tuple[Optional[torch.Tensor], ...]:
        """bias: None, a tensor, or a tuple/list of up to two bf16 [n, H] tensors (None allowed)."""
        if bias is None:
            return None, None
        items = tuple(bias) if isinstance(bias, (tuple, list)) else (bias,)
        if len(items) > 2:
            raise ValueError(f"bias takes at most two tensors, got {len(items)}")
        items = items + (None,) * (2 - len(items))
        return tuple(
            None if item is None
            else check_tensor(f"bias[{i}]", item, torch.bfloat16, self._device, (num_tokens, hidden))
            for i, item in enumerate(items)
        )

    # ---- layout ------------------------------------------------------------------------------------

    def get_dispatch_layout(
        self,
        topk_idx: torch.Tensor,
        num_experts: int,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor, EventOverlap]:
        """Routing -> (num_tokens_per_rank int32[R], num_tokens_per_rdma_rank int32[nodes] or None on one
        node, num_tokens_per_expert int32[E], is_token_in_rank bool[n, R], event)."""
        runtime = self._rt()
        num_topk = self._check_topk_idx(topk_idx)
        num_experts = self._check_num_experts(num_experts)
        self._check_topk_values(topk_idx, num_experts)
        num_tokens = topk_idx.size(0)

        launch = _Launch(self, previous_event, async_finish, allocate_on_comm_stream)
        num_tokens_per_rank = launch.empty((self.group_size,), torch.int32)
        num_tokens_per_expert = launch.empty((num_experts,), torch.int32)
        is_token_in_rank = launch.empty((num_tokens, self.group_size), torch.bool)
        num_nodes = self.group_size // self.nvl_domain_size
        num_tokens_per_rdma_rank = launch.empty((num_nodes,), torch.int32) if num_nodes > 1 else None
        runtime.get_dispatch_layout(
            topk_idx=topk_idx.data_ptr(), num_tokens=num_tokens, num_topk=num_topk, num_experts=num_experts,
            num_tokens_per_rank=num_tokens_per_rank.data_ptr(), num_tokens_per_rdma_rank=_ptr(num_tokens_per_rdma_rank),
            num_tokens_per_expert=num_tokens_per_expert.data_ptr(), is_token_in_rank=is_token_in_rank.data_ptr(),
            stream=launch.stream)
        event = launch.finish(topk_idx)
        return num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event

    # ---- dispatch ----------------------------------------------------------------------------------

    def dispatch(
        self,
        x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]],
        handle: Optional[Tuple] = None,
        num_tokens_per_rank: Optional[torch.Tensor] = None,
        num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
        is_token_in_rank: Optional[torch.Tensor] = None,
        num_tokens_per_expert: Optional[torch.Tensor] = None,
        topk_idx: Optional[torch.Tensor] = None,
        topk_weights: Optional[torch.Tensor] = None,
        expert_alignment: int = 1,
        num_worst_tokens: int = 0,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> Tuple[Any, Optional[torch.Tensor], Optional[torch.Tensor], Optional[List[int]], Optional[Tuple], EventOverlap]:
        """Sends each token once to every rank holding one of its experts. Returns (recv_x,
        recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event); recv_x is
        (fp8, scales) when x is. With `handle` (cached mode): (recv_x, None, None, None, None, event).
        `num_tokens_per_rdma_rank` is unused on one node."""
        self._rt()
        config = self._config(config, Buffer.get_dispatch_config)
        payload = self._check_payload(x)
        self._check_buffer_size(config, payload.hidden_bytes)
        if handle is not None and (topk_idx is not None or topk_weights is not None):
            raise ValueError("a cached dispatch (handle given) takes no topk_idx/topk_weights")
        if self._is_internode():  # several NVLink domains: the composed multi-node path (internode.py)
            if handle is not None:
                return self._internode_cached_dispatch(payload, handle, config, previous_event, async_finish,
                                                       allocate_on_comm_stream)
            return self._internode_dispatch(payload, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
                                            topk_idx, topk_weights, expert_alignment, num_worst_tokens, config,
                                            previous_event, async_finish, allocate_on_comm_stream)
        if handle is not None:
            parts = self._check_handle(handle, config, payload.num_tokens)
            return self._cached_dispatch(payload, parts, config, previous_event, async_finish,
                                         allocate_on_comm_stream)
        return self._fresh_dispatch(payload, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert,
                                    topk_idx, topk_weights, expert_alignment, num_worst_tokens, config,
                                    previous_event, async_finish, allocate_on_comm_stream)

    def _recv_payload(self, launch: _Launch, payload: _Payload, rows: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        recv_x = launch.empty((rows, payload.hidden), payload.data.dtype)
        if payload.scales is None:
            return recv_x, None
        return recv_x, launch.empty((rows, payload.hidden // 128), torch.float32)

    def _payload_args(self, payload: _Payload) -> dict:
        scales = payload.scales
        return dict(
            x=payload.data.data_ptr(), dtype=payload.dtype, num_tokens=payload.num_tokens, hidden=payload.hidden,
            x_scales=_ptr(scales), scale_token_stride=0 if scales is None else scales.stride(0),
            scale_hidden_stride=0 if scales is None else scales.stride(1))

    def _check_fresh_dispatch(self, payload, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                              topk_weights, expert_alignment, num_worst_tokens):
        """The layout, top-k and count arguments of a dispatch without a handle (one node or several).
        Returns (num_experts, num_topk, expert_alignment, num_worst_tokens)."""
        num_tokens, num_ranks = payload.num_tokens, self.group_size
        for name, value in (("num_tokens_per_rank", num_tokens_per_rank), ("is_token_in_rank", is_token_in_rank),
                            ("num_tokens_per_expert", num_tokens_per_expert)):
            if value is None:
                raise ValueError(f"dispatch without a handle needs {name} (from get_dispatch_layout)")
        check_tensor("num_tokens_per_rank", num_tokens_per_rank, torch.int32, self._device, (num_ranks,))
        check_tensor("is_token_in_rank", is_token_in_rank, torch.bool, self._device, (num_tokens, num_ranks))
        check_tensor("num_tokens_per_expert", num_tokens_per_expert, torch.int32, self._device, (None,))
        num_experts = self._check_num_experts(num_tokens_per_expert.size(0), "num_tokens_per_expert.size(0)")
        if (topk_idx is None) != (topk_weights is None):
            raise ValueError("topk_idx and topk_weights must be given together")
        num_topk = 0
        if topk_idx is not None:
            num_topk = self._check_topk_idx(topk_idx, num_tokens)
            check_tensor("topk_weights", topk_weights, torch.float32, self._device, (num_tokens, num_topk))
            self._check_topk_values(topk_idx, num_experts)
        expert_alignment = check_int("expert_alignment", expert_alignment, minimum=1,
                                     maximum=_C.kMaxExpertAlignment)
        num_worst_tokens = check_int("num_worst_tokens", num_worst_tokens, minimum=0)
        return num_experts, num_topk, expert_alignment, num_worst_tokens

    def _fresh_dispatch(self, payload, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                        topk_weights, expert_alignment, num_worst_tokens, config, previous_event, async_finish,
                        allocate_on_comm_stream):
        self._rt()
        num_experts, num_topk, expert_alignment, num_worst_tokens = self._check_fresh_dispatch(
            payload, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
            expert_alignment, num_worst_tokens)
        num_ranks = self.group_size

        launch = _Launch(self, previous_event, async_finish, allocate_on_comm_stream)
        out_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle = self._nvlink_dispatch(
            launch, payload, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
            num_topk, num_experts, num_ranks, expert_alignment, num_worst_tokens, config)
        event = launch.finish(payload, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                              topk_weights)
        return out_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event

    def _nvlink_dispatch(self, launch: _Launch, payload: _Payload, num_tokens_per_rank: torch.Tensor,
                         is_token_in_rank: torch.Tensor, num_tokens_per_expert: torch.Tensor,
                         topk_idx: Optional[torch.Tensor], topk_weights: Optional[torch.Tensor], num_topk: int,
                         num_experts: int, num_ranks: int, expert_alignment: int, num_worst_tokens: int,
                         config: Config):
        """Notify, (host wait,) allocate, dispatch inside this rank's NVLink domain of `num_ranks`
        ranks (the whole group on one node; the NVLink stage of the multi-node path). Returns
        (recv_x or (recv_x, scales), recv_topk_idx, recv_topk_weights, list, 6-tuple handle)."""
        runtime = self._rt()
        num_tokens = payload.num_tokens
        num_channels = runtime.num_channels(config)
        rank_prefix_matrix = launch.empty((num_ranks, num_ranks), torch.int32)
        channel_prefix_matrix = launch.empty((num_ranks, num_channels), torch.int32)
        recv_channel_prefix_matrix = launch.empty((num_ranks, num_channels), torch.int32)
        runtime.notify_dispatch(
            num_tokens_per_rank=num_tokens_per_rank.data_ptr(), num_tokens_per_expert=num_tokens_per_expert.data_ptr(),
            is_token_in_rank=is_token_in_rank.data_ptr(), topk_idx=_ptr(topk_idx), num_tokens=num_tokens,
            num_experts=num_experts,
            expert_alignment=expert_alignment, num_worst_tokens=num_worst_tokens,
            rank_prefix_matrix=rank_prefix_matrix.data_ptr(), channel_prefix_matrix=channel_prefix_matrix.data_ptr(),
            recv_channel_prefix_matrix=recv_channel_prefix_matrix.data_ptr(), config=config, hidden=payload.hidden,
            dtype=payload.dtype, num_topk=num_topk, stream=launch.stream)
        if num_worst_tokens > 0:
            rows, num_recv_tokens_per_expert_list = num_worst_tokens, []
        else:
            rows, num_recv_tokens_per_expert_list = runtime.wait_recv_counts()

        recv_x, recv_x_scales = self._recv_payload(launch, payload, rows)
        recv_topk_idx = launch.empty((rows, num_topk), topk_idx_t) if topk_idx is not None else None
        recv_topk_weights = launch.empty((rows, num_topk), torch.float32) if topk_idx is not None else None
        recv_src_idx = launch.empty((rows,), torch.int32)
        send_head = launch.empty((num_tokens, num_ranks), torch.int32)
        runtime.dispatch(
            **self._payload_args(payload), topk_idx=_ptr(topk_idx), topk_weights=_ptr(topk_weights),
            num_topk=num_topk, num_experts=num_experts, is_token_in_rank=is_token_in_rank.data_ptr(),
            rank_prefix_matrix=rank_prefix_matrix.data_ptr(), channel_prefix_matrix=channel_prefix_matrix.data_ptr(),
            recv_channel_prefix_matrix=recv_channel_prefix_matrix.data_ptr(), num_output_rows=rows,
            worst_case_mode=num_worst_tokens > 0, cached=False, recv_x=recv_x.data_ptr(),
            recv_x_scales=_ptr(recv_x_scales), recv_topk_idx=_ptr(recv_topk_idx),
            recv_topk_weights=_ptr(recv_topk_weights), recv_src_idx=recv_src_idx.data_ptr(),
            send_head=send_head.data_ptr(), config=config, stream=launch.stream)
        handle = (rank_prefix_matrix, channel_prefix_matrix, recv_channel_prefix_matrix, recv_src_idx,
                  is_token_in_rank, send_head)
        out_x = recv_x if recv_x_scales is None else (recv_x, recv_x_scales)
        return out_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle

    def _cached_dispatch(self, payload: _Payload, parts: _Handle, config: Config, previous_event, async_finish,
                         allocate_on_comm_stream):
        launch = _Launch(self, previous_event, async_finish, allocate_on_comm_stream)
        out_x = self._nvlink_cached_dispatch(launch, payload, parts, config)
        event = launch.finish(payload, parts)
        return out_x, None, None, None, None, event

    def _nvlink_cached_dispatch(self, launch: _Launch, payload: _Payload, parts: _Handle, config: Config):
        """A cached dispatch inside this rank's NVLink domain; returns recv_x or (recv_x, scales)."""
        runtime = self._rt()
        rows = parts.recv_src_idx.size(0)
        recv_x, recv_x_scales = self._recv_payload(launch, payload, rows)
        runtime.dispatch(
            **self._payload_args(payload), is_token_in_rank=parts.is_token_in_rank.data_ptr(),
            rank_prefix_matrix=parts.rank_prefix_matrix.data_ptr(),
            channel_prefix_matrix=parts.channel_prefix_matrix.data_ptr(),
            recv_channel_prefix_matrix=parts.recv_channel_prefix_matrix.data_ptr(), num_output_rows=rows,
            worst_case_mode=False, cached=True, recv_x=recv_x.data_ptr(), recv_x_scales=_ptr(recv_x_scales),
            config=config, stream=launch.stream)  # cached: recv_src_idx and send_head are neither read nor written
        return recv_x if recv_x_scales is None else (recv_x, recv_x_scales)

    # ---- combine -----------------------------------------------------------------------------------

    def combine(
        self,
        x: torch.Tensor,
        handle: Tuple,
        topk_weights: Optional[torch.Tensor] = None,
        bias: Union[None, torch.Tensor, Tuple[torch.Tensor, ...]] = None,
        config: Optional[Config] = None,
        previous_event: Optional[EventOverlap] = None,
        async_finish: bool = False,
        allocate_on_comm_stream: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        """Reverse of the dispatch that made `handle`: combined_x[t] = bias0[t] + bias1[t] + the sum of
        the rows of t on every rank that received it (float32 accumulation, no top-k weighting).
        Returns (combined_x bf16[n, H], combined_topk_weights float32[n, K] or None, event)."""
        self._rt()
        config = self._config(config, Buffer.get_combine_config)
        if self._is_internode():
            return self._internode_combine(x, handle, topk_weights, bias, config, previous_event, async_finish,
                                           allocate_on_comm_stream)
        parts = self._check_handle(handle, config)
        num_tokens, num_recv = parts.is_token_in_rank.size(0), parts.recv_src_idx.size(0)
        check_tensor("x", x, torch.bfloat16, self._device, (num_recv, None))
        hidden = x.size(1)
        if hidden == 0 or hidden * x.element_size() % 16 != 0:
            raise ValueError(f"x rows must be a multiple of 16 bytes, got hidden={hidden}")
        check_aligned("x", x)
        num_topk = 0
        if topk_weights is not None:
            check_tensor("topk_weights", topk_weights, torch.float32, self._device, (num_recv, None))
            num_topk = topk_weights.size(1)
            if not 1 <= num_topk <= _MAX_TOPK:
                raise ValueError(f"topk_weights has {num_topk} columns; top-k must be in [1, {_MAX_TOPK}]")
        bias0, bias1 = self._check_bias(bias, num_tokens, hidden)
        check_aligned("bias[0]", bias0)
        check_aligned("bias[1]", bias1)
        self._check_buffer_size(config, hidden * 2)

        launch = _Launch(self, previous_event, async_finish, allocate_on_comm_stream)
        combined_x, combined_topk_weights = self._nvlink_combine(launch, x, parts, topk_weights, num_topk, bias0,
                                                                 bias1, config)
        event = launch.finish(x, topk_weights, bias0, bias1, parts)
        return combined_x, combined_topk_weights, event

    def _nvlink_combine(self, launch: _Launch, x: torch.Tensor, parts: _Handle, topk_weights: Optional[torch.Tensor],
                        num_topk: int, bias0: Optional[torch.Tensor], bias1: Optional[torch.Tensor], config: Config):
        """A combine inside this rank's NVLink domain; returns (combined_x, combined_topk_weights)."""
        runtime = self._rt()
        num_tokens, num_recv, hidden = parts.is_token_in_rank.size(0), parts.recv_src_idx.size(0), x.size(1)
        combined_x = launch.empty((num_tokens, hidden), torch.bfloat16)
        combined_topk_weights = launch.empty((num_tokens, num_topk), torch.float32) if num_topk else None
        runtime.combine(
            x=x.data_ptr(), num_recv_tokens=num_recv, hidden=hidden, topk_weights=_ptr(topk_weights),
            num_topk=num_topk, bias0=_ptr(bias0), bias1=_ptr(bias1),
            rank_prefix_matrix=parts.rank_prefix_matrix.data_ptr(),
            channel_prefix_matrix=parts.channel_prefix_matrix.data_ptr(),
            recv_channel_prefix_matrix=parts.recv_channel_prefix_matrix.data_ptr(),
            is_token_in_rank=parts.is_token_in_rank.data_ptr(), send_head=parts.send_head.data_ptr(),
            num_tokens=num_tokens, num_channels=parts.channel_prefix_matrix.size(1), combined_x=combined_x.data_ptr(),
            combined_topk_weights=_ptr(combined_topk_weights), config=config, stream=launch.stream)
        return combined_x, combined_topk_weights
