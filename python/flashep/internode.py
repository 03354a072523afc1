"""Multi-node dispatch and combine, composed of stages (docs/design.md, "Multi-node: the first
version"), mixed into flashep.Buffer when the group spans several NVLink domains:

  dispatch: the rail stage (`_C.rail_exchange`: every token once per destination node to the rank
            with the same local index there, over NVSHMEM) -> the single-node dispatch inside each
            node on the forwarded rows (N x T of them, the node's experts numbered from 0) -> the
            reordering into the contract's order (by global source rank, then token);
  combine:  the reordering back -> the single-node combine inside each node (one row per forwarded
            token at its forwarder) -> the rail return (`_C.rail_return`: each row back to its
            source, which adds the nodes' rows and the biases).

The outputs and the two handle entries users read (handle[0] = is_token_in_rank, handle[-4] =
recv_gbl_rank_prefix_sum) are DeepEP's; the other eight entries are flashep's own. Written
2026-11-30 (second session); tested on 2 GPUs as 2 nodes of 1 (third session).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist

from . import _C, env
from .utils import EventOverlap, check_aligned, check_tensor

topk_idx_t = torch.int64


class InternodeHandle(tuple):
    """The multi-node dispatch handle: 10 entries, DeepEP's order of meaning for [0] and [-4]:
    (is_token_in_rank, rail_slot, rail_count, fwd_counts, fwd_source, final_row,
     recv_gbl_rank_prefix_sum, nvlink_recv_src_idx, nvlink_rank_prefix_matrix, nvlink_send_head),
    plus what combine needs: the NVLink stage's 6-tuple handle and the rail stage's shape."""

    nvlink: tuple
    max_tokens: int
    fp8: bool
    num_topk: int
    hidden: int
    buffer_id: int


class InternodeMixin:
    """The multi-node paths of Buffer (see the module docstring)."""

    def _is_internode(self) -> bool:
        return self.nvl_domain_size < self.group_size

    def _rail_max_tokens(self, hidden: int, fp8: bool, num_topk: int) -> int:
        """T of the rail stage: FLASHEP_INTERNODE_MAX_TOKENS, lowered to what num_rdma_bytes holds
        (the same on every rank: the call's shape and the buffer's sizes are)."""
        R, M = self.group_size, self.nvl_domain_size
        cap = min(env.internode_max_tokens(), _C.kMaxRailTokens)
        cache = self.__dict__.setdefault("_rail_tokens", {})  # (hidden, fp8, top-k, cap) -> T: searched once
        key = (hidden, fp8, num_topk, cap)
        if key in cache:
            return cache[key]

        def fits(tokens: int) -> bool:
            return _C.internode_rail_bytes(R, M, tokens, hidden, fp8, num_topk) <= self.num_rdma_bytes

        if cap < 1 or not fits(1):
            raise RuntimeError(
                f"flashep: multi-node dispatch needs num_rdma_bytes >= "
                f"{_C.internode_rail_bytes(R, M, 1, hidden, fp8, num_topk)} even for one token per rank "
                f"(hidden={hidden}, the Buffer has {self.num_rdma_bytes})")
        low, high = 1, cap
        while low < high:  # the largest T that fits
            mid = (low + high + 1) // 2
            if fits(mid):
                low = mid
            else:
                high = mid - 1
        cache[key] = low
        return low

    def _internode_dispatch(self, payload, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                            topk_weights, expert_alignment, num_worst_tokens, config, previous_event, async_finish,
                            allocate_on_comm_stream):
        from .buffer import _Launch, _ptr  # noqa: F401  (the module imports this one)

        runtime = self._rt()
        R, M = self.group_size, self.nvl_domain_size
        n, H = payload.num_tokens, payload.hidden
        fp8 = payload.scales is not None
        num_experts, K, expert_alignment, num_worst_tokens = self._check_fresh_dispatch(
            payload, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
            expert_alignment, num_worst_tokens)
        T = self._rail_max_tokens(H, fp8, K)
        if n > T:
            raise ValueError(f"flashep: {n} tokens but the multi-node dispatch takes at most {T} per rank "
                             "(FLASHEP_INTERNODE_MAX_TOKENS, num_rdma_bytes)")
        L = num_experts // R

        launch = _Launch(self, previous_event, async_finish, allocate_on_comm_stream)
        rail = self._rail_exchange(launch, payload, topk_idx, topk_weights, K, num_experts, is_token_in_rank, T)
        rail_slot, rail_count, fwd_x, fwd_scales, fwd_idx, fwd_w, fwd_in, fwd_src, fwd_counts = rail
        # The NVLink stage's layout of the forwarded rows (on the comm stream; no host sync).
        with torch.cuda.stream(launch.comm):
            nv_per_rank = fwd_in.sum(0, dtype=torch.int32)
            if K:  # from the forwarded ids (clamped: after a failed rail stage they are garbage, and the error comes later)
                nv_per_expert = torch.zeros((M * L + 1,), dtype=torch.int32, device=self._device)
                nv_per_expert.scatter_add_(0, (fwd_idx + 1).clamp(0, M * L).flatten(),
                                           torch.ones((fwd_idx.numel(),), dtype=torch.int32, device=self._device))
                nv_per_expert = nv_per_expert[1:]
            else:
                # No ids travel: the per-expert counts are the sources' own (as on one node), those of
                # the ranks this rank forwards for (same local index, every node), for this node's experts.
                every = torch.empty((R, num_experts), dtype=torch.int32, device=self._device)
                dist.all_gather_into_tensor(every, num_tokens_per_expert, group=self.group)
                node, me = self.rank // M, self.rank % M
                nv_per_expert = every[me::M, node * M * L:(node + 1) * M * L].sum(0, dtype=torch.int32)
        from .buffer import _Payload
        forwarded = _Payload(fwd_x, fwd_scales)
        nv_x, nv_idx, nv_w, per_expert_list, nv_handle = self._nvlink_dispatch(
            launch, forwarded, nv_per_rank, fwd_in, nv_per_expert, fwd_idx, fwd_w, K, M * L, M, expert_alignment,
            num_worst_tokens, config)
        nv_recv_x, nv_recv_scales = (nv_x if fp8 else (nv_x, None))
        rows = nv_recv_x.size(0)
        # Reordering.
        final_row = launch.empty((rows,), torch.int32)
        recv_gbl_rank_prefix_sum = launch.empty((R,), torch.int32)
        _C.reorder_plan(runtime, nv_handle[0].data_ptr(), nv_handle[3].data_ptr(), T, rows, final_row.data_ptr(),
                        recv_gbl_rank_prefix_sum.data_ptr(), launch.stream)
        recv_x = launch.empty((rows, H), nv_recv_x.dtype)
        recv_scales = launch.empty((rows, H // 128), torch.float32) if fp8 else None
        recv_idx = launch.empty((rows, K), topk_idx_t) if K else None
        recv_w = launch.empty((rows, K), torch.float32) if K else None
        if num_worst_tokens > 0 and K:
            with torch.cuda.stream(launch.comm):  # rows past the real count: ids -1, weights 0
                recv_idx.fill_(-1)
                recv_w.zero_()
        _C.reorder_copy(runtime, final_row.data_ptr(), rows, H, fp8, K, True, nv_recv_x.data_ptr(), recv_x.data_ptr(),
                        _ptr(nv_recv_scales), _ptr(recv_scales), _ptr(nv_idx), _ptr(recv_idx), _ptr(nv_w), _ptr(recv_w),
                        launch.stream)
        event = launch.finish(payload, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                              topk_weights)
        handle = InternodeHandle((is_token_in_rank, rail_slot, rail_count, fwd_counts, fwd_src, final_row,
                                  recv_gbl_rank_prefix_sum, nv_handle[3], nv_handle[0], nv_handle[5]))
        handle.nvlink, handle.max_tokens, handle.fp8, handle.num_topk, handle.hidden = nv_handle, T, fp8, K, H
        handle.buffer_id = runtime.id
        out_x = recv_x if recv_scales is None else (recv_x, recv_scales)
        return out_x, recv_idx, recv_w, per_expert_list, handle, event

    def _rail_exchange(self, launch, payload, topk_idx, topk_weights, K, num_experts, is_token_in_rank, T):
        """The rail stage into fresh tensors of N * T rows (allocated on the launch's stream)."""
        from .buffer import _ptr

        R, M = self.group_size, self.nvl_domain_size
        N, n, H = R // M, payload.num_tokens, payload.hidden
        fp8 = payload.scales is not None
        F = N * T
        rail_slot = launch.empty((max(n, 1), N), torch.int32)
        rail_count = launch.empty((N,), torch.int32)
        fwd_x = launch.empty((F, H), payload.data.dtype)
        fwd_scales = launch.empty((F, H // 128), torch.float32) if fp8 else None
        fwd_idx = launch.empty((F, K), topk_idx_t) if K else None
        fwd_w = launch.empty((F, K), torch.float32) if K else None
        fwd_in = launch.empty((F, M), torch.bool)
        fwd_src = launch.empty((F, 2), torch.int32)
        fwd_counts = launch.empty((N,), torch.int32)
        scales = payload.scales
        _C.rail_exchange(self._rt(), payload.data.data_ptr(), fp8, H, _ptr(scales),
                         0 if scales is None else scales.stride(0), 0 if scales is None else scales.stride(1),
                         _ptr(topk_idx), _ptr(topk_weights), K, num_experts, is_token_in_rank.data_ptr(), n, T,
                         rail_slot.data_ptr(), rail_count.data_ptr(), fwd_x.data_ptr(), _ptr(fwd_scales), _ptr(fwd_idx),
                         _ptr(fwd_w), fwd_in.data_ptr(), fwd_src.data_ptr(), fwd_counts.data_ptr(), 0, launch.stream)
        return rail_slot, rail_count, fwd_x, fwd_scales, fwd_idx, fwd_w, fwd_in, fwd_src, fwd_counts

    def _check_internode_handle(self, handle: Any, num_tokens: Optional[int] = None) -> InternodeHandle:
        if not isinstance(handle, InternodeHandle):
            raise ValueError("handle must be the one returned by a multi-node dispatch of this Buffer")
        if handle.buffer_id != self._rt().id:
            raise ValueError("handle was made by another Buffer")
        if num_tokens is not None and handle[0].size(0) != num_tokens:
            raise ValueError(f"handle is for {handle[0].size(0)} tokens, x has {num_tokens}")
        return handle

    def _internode_cached_dispatch(self, payload, handle, config, previous_event, async_finish,
                                   allocate_on_comm_stream):
        from .buffer import _Handle, _Launch, _Payload, _ptr

        handle = self._check_internode_handle(handle, payload.num_tokens)
        # The dtype may differ from the handle's dispatch (FP8 forward, BF16 gradients in the backward):
        # the rail slots are strided for the largest form. The hidden size fixes that stride, so it may not.
        if payload.hidden != handle.hidden:
            raise ValueError(f"a cached multi-node dispatch needs the hidden size of the handle's dispatch "
                             f"({handle.hidden}), x has {payload.hidden}")
        runtime = self._rt()
        T, H, fp8 = handle.max_tokens, payload.hidden, payload.scales is not None
        launch = _Launch(self, previous_event, async_finish, allocate_on_comm_stream)
        rail = self._rail_exchange(launch, payload, None, None, 0, self.group_size, handle[0], T)
        fwd_x, fwd_scales = rail[2], rail[3]
        nv_out = self._nvlink_cached_dispatch(launch, _Payload(fwd_x, fwd_scales), _Handle(*handle.nvlink), config)
        nv_recv_x, nv_recv_scales = (nv_out if fp8 else (nv_out, None))
        rows = nv_recv_x.size(0)
        recv_x = launch.empty((rows, H), nv_recv_x.dtype)
        recv_scales = launch.empty((rows, H // 128), torch.float32) if fp8 else None
        _C.reorder_copy(runtime, handle[5].data_ptr(), rows, H, fp8, 0, True, nv_recv_x.data_ptr(), recv_x.data_ptr(),
                        _ptr(nv_recv_scales), _ptr(recv_scales), 0, 0, 0, 0, launch.stream)
        event = launch.finish(payload, handle, handle.nvlink)
        out_x = recv_x if recv_scales is None else (recv_x, recv_scales)
        return out_x, None, None, None, None, event

    def _internode_combine(self, x, handle, topk_weights, bias, config, previous_event, async_finish,
                           allocate_on_comm_stream) -> Tuple[torch.Tensor, Optional[torch.Tensor], EventOverlap]:
        from .buffer import _Handle, _Launch, _ptr

        handle = self._check_internode_handle(handle)
        runtime = self._rt()
        R, M = self.group_size, self.nvl_domain_size
        N = R // M
        T, Kd = handle.max_tokens, handle.num_topk
        rows = handle[5].size(0)
        n = handle[0].size(0)
        check_tensor("x", x, torch.bfloat16, self._device, (rows, handle.hidden))
        check_aligned("x", x)
        H = x.size(1)
        K = 0
        if topk_weights is not None:
            check_tensor("topk_weights", topk_weights, torch.float32, self._device, (rows, Kd))
            K = Kd
        bias0, bias1 = self._check_bias(bias, n, H)
        check_aligned("bias[0]", bias0)
        check_aligned("bias[1]", bias1)
        launch = _Launch(self, previous_event, async_finish, allocate_on_comm_stream)
        # Back into the NVLink stage's order, its combine (one row per forwarded token), the return.
        nv_x = launch.empty((rows, H), torch.bfloat16)
        nv_w = launch.empty((rows, K), torch.float32) if K else None
        _C.reorder_copy(runtime, handle[5].data_ptr(), rows, H, False, K, False, x.data_ptr(), nv_x.data_ptr(), 0, 0,
                        0, 0, _ptr(topk_weights), _ptr(nv_w), launch.stream)
        combined, combined_w = self._nvlink_combine(launch, nv_x, _Handle(*handle.nvlink), nv_w, K, None, None,
                                                    config)
        out_x = launch.empty((n, H), torch.bfloat16)
        out_w = launch.empty((n, K), torch.float32) if K else None
        _C.rail_return(runtime, combined.data_ptr(), _ptr(combined_w), handle[3].data_ptr(), handle[1].data_ptr(), n,
                       _ptr(bias0), _ptr(bias1), out_x.data_ptr(), _ptr(out_w), H, K, T, handle.fp8, Kd, 0,
                       launch.stream)
        assert combined.size(0) == N * T
        event = launch.finish(x, topk_weights, bias0, bias1, handle, handle.nvlink)
        return out_x, out_w, event
