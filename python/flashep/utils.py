"""Helpers of the torch layer: EventOverlap (DeepEP's name and behaviour) and argument checks.

The check_* functions raise TypeError (wrong type or dtype) or ValueError (wrong shape, device,
layout or value) with a message that names the argument; they never call into the C++ core.
"""
from __future__ import annotations

import operator
import random
import socket
from typing import Any, Iterable, Iterator, Optional, Sequence

import torch

#: dtype of top-k expert indices (-1 = empty slot).
topk_idx_t = torch.int64


class EventOverlap:
    """A CUDA event plus the tensors that must stay alive until it completes.

    `current_stream_wait()` makes the current stream wait for the event (a no-op without one: the
    call that returned it had already made the current stream wait). As a context manager it waits
    on exit, so work inside the `with` block overlaps with the communication:

        _, _, _, _, _, event = buffer.dispatch(..., async_finish=True)
        with event:
            other_work()   # runs while the dispatch is in flight
        # here the current stream is ordered after the dispatch

    `extra_tensors` keeps inputs/outputs alive (instead of relying on record_stream alone), which
    is what CUDA-graph capture needs.
    """

    def __init__(self, event: Optional[torch.cuda.Event] = None, extra_tensors: Optional[Sequence[Any]] = None):
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self.current_stream_wait()

    def __repr__(self) -> str:
        return f"EventOverlap(event={self.event!r})"


def event_of(previous_event: Any) -> Optional[torch.cuda.Event]:
    """The torch.cuda.Event of an EventOverlap (or of a bare Event); None for None or no event."""
    if previous_event is None:
        return None
    if isinstance(previous_event, EventOverlap):
        return previous_event.event
    if isinstance(previous_event, torch.cuda.Event):
        return previous_event
    raise TypeError(f"previous_event must be an EventOverlap (e.g. Buffer.capture()), got "
                    f"{type(previous_event).__name__}")


def iter_tensors(items: Iterable[Any]) -> Iterator[torch.Tensor]:
    """Every tensor in `items`, descending into tuples and lists (None and the rest are skipped)."""
    for item in items:
        if isinstance(item, torch.Tensor):
            yield item
        elif isinstance(item, (tuple, list)):
            yield from iter_tensors(item)


def check_int(name: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """`value` as an int (Python or numpy integer), within [minimum, maximum] when given."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def _shape_text(shape: Sequence[Any]) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in shape) + "]"


def check_tensor(
    name: str,
    tensor: Any,
    dtype: torch.dtype,
    device: torch.device,
    shape: Sequence[Optional[int]],
    contiguous: bool = True,
) -> torch.Tensor:
    """Checks type, dtype, device, shape (None entries match any size) and, unless told otherwise,
    contiguity. Returns the tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{name} must be on {device} (this Buffer's device), got {tensor.device}")
    if tensor.dim() != len(shape) or any(
        expected is not None and actual != expected for actual, expected in zip(tensor.shape, shape)
    ):
        raise ValueError(f"{name} must have shape {_shape_text(shape)}, got {list(tensor.shape)}")
    if contiguous and not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")
    return tensor


def check_aligned(name: str, tensor: Optional[torch.Tensor], alignment: int = 16) -> None:
    """The kernels move rows with 16-byte accesses: a view with an odd storage offset would fault."""
    if tensor is not None and tensor.numel() > 0 and tensor.data_ptr() % alignment != 0:
        raise ValueError(f"{name} must start at a {alignment}-byte aligned address (a view with an odd "
                         "storage offset?); pass a fresh tensor or .clone() it")


def check_topk_values(name: str, topk_idx: torch.Tensor, num_experts: int) -> None:
    """Host check (one device-to-host sync) that every index is in [-1, num_experts)."""
    if topk_idx.numel() == 0:
        return
    bad = (topk_idx < -1) | (topk_idx >= num_experts)
    if not bool(bad.any()):
        return
    position = bad.nonzero()[0].tolist()
    value = int(topk_idx[tuple(position)])
    index = "".join(f"[{p}]" for p in position)
    raise ValueError(f"{name}{index} = {value} is outside [-1, {num_experts})")


class DeviceMemory:
    """Raw device memory exposed through __cuda_array_interface__ (version 3) as uint8 [nbytes],
    so torch.as_tensor can view it without copying. The memory is not owned."""

    def __init__(self, pointer: int, nbytes: int):
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (pointer, False),
            "strides": None,
            "version": 3,
        }


def free_tcp_port() -> int:
    """A free local TCP port for a rendezvous (rank 0's TCPStore), outside the kernel's ephemeral
    range: a port the kernel hands out (bind to port 0) is free only until an outgoing connection
    (NCCL's bootstrap, a store client) is given it, which failed a test with EADDRINUSE on
    2026-12-01. Probed on the wildcard addresses (the store listens there). Falls back to the
    kernel's pick."""
    low, high = 32768, 60999
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(v) for v in f.read().split()[:2])
    except (OSError, ValueError):
        pass
    candidates = list(range(max(1024, low - 12000), max(1024, low - 1)))
    candidates += list(range(high + 1, min(65536, high + 4000)))
    random.SystemRandom().shuffle(candidates)

    def bindable(family: int, address: str, port: int) -> bool:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((address, port))
                return True
        except OSError as error:
            # No IPv6 on this host: only IPv4 matters.
            return family == socket.AF_INET6 and error.errno in (97, 99)  # EAFNOSUPPORT, EADDRNOTAVAIL

    for port in candidates[:200]:
        if bindable(socket.AF_INET, "", port) and bindable(socket.AF_INET6, "::", port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # the kernel's pick
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", 0))
        return s.getsockname()[1]
