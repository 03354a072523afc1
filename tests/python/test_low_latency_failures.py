"""GPU failure behaviour of the low-latency mode, 2 ranks (written for any R: the last rank is the
one that fails), over NVLink stores and (forced) NVSHMEM:
  * a rank that skips a call: without enable_shrink the others raise FlashepTimeoutError naming
    the phase and the rank within FLASHEP_TIMEOUT_S (+ slack), and the skipper's next call raises
    (the abort reached it); with enable_shrink the others mask it (query_mask shows it), finish the
    call with correct results for the rest (the oracle with that rank masked), and keep serving
    through later calls; update/clean of the mask work;
  * an expert id out of range with the host check off: the GPU check fails the call before
    anything is sent, every rank raises;
  * one rank hooks its combine and the other does not (over NVLink the two combine wires differ):
    both raise at once, the fused rank a FlashepPeerMismatchError.
The shrink test also serves hooked calls after the masking (the per-slot combine's masking).

    python3 -m pytest -v -s tests/python/test_low_latency_failures.py
"""
from __future__ import annotations

import os
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_harness as dh  # noqa: E402

TIMEOUT_S = 3
MUST_RAISE_WITHIN_S = 15
T, H, E, K = 32, 2048, 16, 4


@pytest.mark.parametrize("transport", ("nvlink", "nvshmem"))
@pytest.mark.parametrize("shrink", (False, True), ids=("no-shrink", "shrink"))
def test_rank_skips_a_call(shrink, transport):
    if transport == "nvshmem":
        from test_low_latency import _require_nvshmem
        _require_nvshmem()
    dh.run_world(_skip_worker, 2, args=(shrink, transport), timeout_s=240, grace_s=60, exit_grace_s=60,
                 env={"FLASHEP_TIMEOUT_S": str(TIMEOUT_S), "NVSHMEM_REMOTE_TRANSPORT": "none"})


def test_hooked_and_fused_combine_disagree():
    """Rank 0 hooks its combine, rank 1 does not: on NVLink the hooked call uses the per-slot wire and
    the fused one the reduced wire. Both ranks raise well before the timeout; the fused rank names
    the mismatch (the hooked rank's weights block carries its call hash)."""
    results = dh.run_world(_hook_mismatch_worker, 2, timeout_s=240, grace_s=60, env={"FLASHEP_TIMEOUT_S": "20"})
    if results[0] is not True:  # ("skip", why): decided by the workers, which see the transports
        pytest.skip(results[0][1])


@pytest.mark.parametrize("world_size", (1, 2), ids=("R1", "R2"))
def test_overwrite_of_a_pending_hook(world_size):
    """Dispatch A with the hook, B without, then C (two calls after A: A's half) before A's hook: C
    would overwrite A's data, so every rank's C fails on the GPU before sending anything, naming the
    calls (a FlashepDeviceFaultError), instead of A's hook reading C's data."""
    results = dh.run_world(_pending_hook_worker, world_size, timeout_s=240, grace_s=60,
                           env={"FLASHEP_TIMEOUT_S": "20"})
    # A rank whose C found the other's abort first raises FlashepPeerFailedError (or Poisoned).
    assert all(kind in ("FlashepDeviceFaultError", "FlashepPeerFailedError", "FlashepPoisonedError")
               for kind, _ in results), results
    faults = [text for kind, text in results if kind == "FlashepDeviceFaultError"]
    assert faults and all("hook" in text and "has not run" in text for text in faults), results


def test_credit_waits_for_a_slow_receiver():
    """The last rank sends dispatch A with the hook and runs A's hook 2 s late; meanwhile the others
    run A and B fused and send C, which rewrites A's half of the last rank's inbox: C's send waits for
    the last rank's credit (it finished receiving A) instead of overwriting A. A's combine is then
    checked on every rank, and the other ranks' C took the delay."""
    results = dh.run_world(_slow_receiver_worker, 2, timeout_s=240, grace_s=60, env={"FLASHEP_TIMEOUT_S": "20"})
    if results[0] is not True:
        pytest.skip(results[0][1])


def test_invalid_expert_found_on_gpu():
    dh.run_world(_bad_expert_worker, 2, timeout_s=240, grace_s=60,
                 env={"FLASHEP_TIMEOUT_S": "20", "FLASHEP_CHECK_INPUTS": "0"})


def _ll_buffer(flashep, R, **options):
    """A low-latency Buffer sized for this file's (T, H, R, E), destroyed explicitly by the worker."""
    return flashep.Buffer(None, 0, flashep.Buffer.get_low_latency_rdma_size_hint(T, H, R, E), low_latency_mode=True,
                          explicitly_destroy=True, **options)


def _inputs(torch, rank, R, seed, dev):
    g = torch.Generator().manual_seed(seed * 100 + rank)
    x = (torch.randn((T, H), generator=g) * 2).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand((T, K), generator=g) + 0.1
    return x.to(dev), idx.to(dev), w.to(dev), x, idx, w


def _all_inputs(torch, R, seed, dev):
    return [_inputs(torch, r, R, seed, dev) for r in range(R)]


def _check_against_oracle(torch, buffer, rank, R, seed, masked, dev, hook=False):
    """One dispatch + combine among the unmasked ranks (with the receive hooks when `hook`);
    returns a problem description or ''."""
    from flashep import _C
    ins = _all_inputs(torch, R, seed, dev)
    x, idx, w = ins[rank][:3]
    recv, count, handle, _, h = buffer.low_latency_dispatch(x, idx, T, E, use_fp8=False, return_recv_hook=hook)
    if hook:
        h()
    y = recv.clone()  # identity experts
    out, _, h = buffer.low_latency_combine(y, idx, w, handle, return_recv_hook=hook)
    if hook:
        h()
    torch.cuda.synchronize()
    mask = [1 if r in masked else 0 for r in range(R)]
    routing = _C.oracle_ll_dispatch_routing([i[4].numpy() for i in ins], E, T, mask)
    want_count = list(routing[rank][0])
    if count.cpu().tolist() != want_count:
        return f"recv_count {count.cpu().tolist()} != oracle {want_count} (masked {masked})"
    L = E // R
    x_cpu, idx_cpu, w_cpu = ins[rank][3:]
    keep = torch.tensor([[int(e) >= 0 and int(e) // L not in masked for e in row] for row in idx_cpu.tolist()])
    ref = ((w_cpu * keep).sum(1, keepdim=True) * x_cpu.float())
    if not torch.allclose(out.cpu().float(), ref, rtol=2 ** -7, atol=1e-5):
        return f"combine off by {float((out.cpu().float() - ref).abs().max())} (masked {masked})"
    return ""


def _skip_worker(rank, world_size, shrink, transport):
    import torch
    import torch.distributed as dist

    import flashep
    R = world_size
    dev = torch.device("cuda", torch.cuda.current_device())
    skipper = R - 1
    buffer = _ll_buffer(flashep, R, allow_nvlink_for_low_latency_mode=(transport == "nvlink"), enable_shrink=shrink)
    problem = _check_against_oracle(torch, buffer, rank, R, 1, set(), dev)
    assert not problem, f"rank {rank} before the failure: {problem}"
    dist.barrier()
    if rank == skipper:
        # Skips the next call; stays alive (its memory stays mapped) until the others are done.
        dist.barrier()
        if not shrink:
            torch.cuda.synchronize()
            with pytest.raises((flashep.FlashepPeerFailedError, flashep.FlashepPoisonedError, flashep.FlashepError)):
                buffer.low_latency_dispatch(*_inputs(torch, rank, R, 2, dev)[:2], T, E, use_fp8=False)
                torch.cuda.synchronize()
                buffer.runtime.check()
        dist.barrier()
        buffer.destroy() if not shrink else None
        return True
    start = time.monotonic()
    if not shrink:
        x, idx, _ = _inputs(torch, rank, R, 2, dev)[:3]
        with pytest.raises(flashep.FlashepTimeoutError) as info:
            buffer.low_latency_dispatch(x, idx, T, E, use_fp8=False)
            torch.cuda.synchronize()
            buffer.runtime.check()
        elapsed = time.monotonic() - start
        message = str(info.value)
        assert "low_latency_dispatch receive" in message and f"rank {skipper}" in message, message
        assert elapsed < MUST_RAISE_WITHIN_S, f"the error came after {elapsed:.1f} s"
        dist.barrier()
        dist.barrier()
        buffer.destroy()
        return True
    # Shrink: the call completes without the skipper, and later calls keep working.
    problem = _check_against_oracle(torch, buffer, rank, R, 2, {skipper}, dev)
    elapsed = time.monotonic() - start
    assert not problem, f"rank {rank} in the masked call: {problem}"
    assert elapsed < MUST_RAISE_WITHIN_S + TIMEOUT_S, f"the masked call took {elapsed:.1f} s"
    status = torch.zeros((R,), dtype=torch.int32, device=dev)
    buffer.low_latency_query_mask_buffer(status)
    torch.cuda.synchronize()
    assert status.cpu().tolist() == [1 if r == skipper else 0 for r in range(R)], status.cpu().tolist()
    for seed in range(3, 8):  # keeps serving (hooked calls too); these calls take no timeout (the rank is masked)
        start = time.monotonic()
        problem = _check_against_oracle(torch, buffer, rank, R, seed, {skipper}, dev, hook=seed % 2 == 0)
        assert not problem, f"rank {rank} after masking: {problem}"
        assert time.monotonic() - start < TIMEOUT_S, "a call after masking waited for the masked rank"
    # The mask API: clear and set by hand.
    buffer.low_latency_clean_mask_buffer()
    buffer.low_latency_query_mask_buffer(status)
    torch.cuda.synchronize()
    assert status.cpu().tolist() == [0] * R
    buffer.low_latency_update_mask_buffer(skipper, True)
    buffer.low_latency_query_mask_buffer(status)
    torch.cuda.synchronize()
    assert status.cpu().tolist() == [1 if r == skipper else 0 for r in range(R)]
    problem = _check_against_oracle(torch, buffer, rank, R, 9, {skipper}, dev)
    assert not problem, f"rank {rank} after masking by hand: {problem}"
    torch.cuda.synchronize()
    dist.barrier()
    dist.barrier()
    return True


def _hook_mismatch_worker(rank, world_size):
    import torch
    import torch.distributed as dist

    import flashep
    R = world_size
    dev = torch.device("cuda", torch.cuda.current_device())
    buffer = _ll_buffer(flashep, R)
    # The two wires differ only when every peer is reached over NVLink (else a hooked combine uses
    # the reduced wire too, and nothing disagrees). This buffer allows NVLink for the low-latency
    # path, so the NVLink domain's transports tell.
    transports = [buffer.runtime.peer_transport(r) for r in range(R)]
    if any(t not in ("nvlink", "self") for t in transports):
        buffer.destroy()
        return ("skip", f"the peers are not all on NVLink ({transports}): both combines use the same wire")
    problem = _check_against_oracle(torch, buffer, rank, R, 1, set(), dev, hook=True)
    assert not problem, f"rank {rank}, every rank hooked: {problem}"
    x, idx, w = _inputs(torch, rank, R, 2, dev)[:3]
    recv, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, T, E, use_fp8=False)
    torch.cuda.synchronize()
    dist.barrier()
    start = time.monotonic()
    with pytest.raises(flashep.FlashepError) as info:
        _, _, hook = buffer.low_latency_combine(recv.clone(), idx, w, handle, return_recv_hook=(rank == 0))
        if hook is not None:
            hook()
        torch.cuda.synchronize()
        buffer.runtime.check()
    elapsed = time.monotonic() - start
    assert elapsed < MUST_RAISE_WITHIN_S, f"rank {rank}: the error came after {elapsed:.1f} s: {info.value}"
    if rank == R - 1:
        assert isinstance(info.value, flashep.FlashepPeerMismatchError), repr(info.value)
    dist.barrier()
    buffer.destroy()
    return True


def _bad_expert_worker(rank, world_size):
    import torch
    import torch.distributed as dist

    import flashep
    R = world_size
    dev = torch.device("cuda", torch.cuda.current_device())
    buffer = _ll_buffer(flashep, R)
    x, idx, _ = _inputs(torch, rank, R, 1, dev)[:3]
    if rank == 0:
        idx[3, 1] = E  # out of range
    with pytest.raises(flashep.FlashepError) as info:
        buffer.low_latency_dispatch(x, idx, T, E, use_fp8=False)
        torch.cuda.synchronize()
        buffer.runtime.check()
    if rank == 0:
        assert isinstance(info.value, flashep.FlashepDeviceFaultError), repr(info.value)
        assert "topk_idx entry" in str(info.value), str(info.value)
    dist.barrier()
    buffer.destroy()
    return True


def _pending_hook_worker(rank, world_size):
    import torch

    import flashep
    R = world_size
    dev = torch.device("cuda", torch.cuda.current_device())
    buffer = _ll_buffer(flashep, R)
    x, idx, _ = _inputs(torch, rank, R, 1, dev)[:3]
    _, _, _, _, hook_a = buffer.low_latency_dispatch(x, idx, T, E, use_fp8=False, return_recv_hook=True)
    buffer.low_latency_dispatch(x, idx, T, E, use_fp8=False)  # B, fused
    torch.cuda.synchronize()
    with pytest.raises(flashep.FlashepError) as info:
        buffer.low_latency_dispatch(x, idx, T, E, use_fp8=False)  # C: A's half, A's hook not run
        torch.cuda.synchronize()
        buffer.runtime.check()
    buffer.destroy()
    return type(info.value).__name__, str(info.value)


def _slow_receiver_worker(rank, world_size):
    import torch
    import torch.distributed as dist

    import flashep
    R = world_size
    slow = R - 1
    dev = torch.device("cuda", torch.cuda.current_device())
    buffer = _ll_buffer(flashep, R)
    transports = [buffer.runtime.peer_transport(r) for r in range(R)]
    if any(t not in ("nvlink", "self") for t in transports):  # credits are for direct peers
        buffer.destroy()
        return ("skip", f"the peers are not all on NVLink ({transports})")
    runs = [_inputs(torch, rank, R, seed, dev)[:3] for seed in (1, 2, 3)]
    for attempt in range(2):  # the second after clean_low_latency_buffer (no stale credit may pass)
        if attempt == 1:
            buffer.clean_low_latency_buffer(T, H, E)
        _slow_receiver_round(torch, dist, buffer, rank, slow, runs)
    dist.barrier()
    buffer.destroy()
    return True


def _slow_receiver_round(torch, dist, buffer, rank, slow, runs):
    dist.barrier()
    a = buffer.low_latency_dispatch(runs[0][0], runs[0][1], T, E, use_fp8=False, return_recv_hook=(rank == slow))
    buffer.low_latency_dispatch(runs[1][0], runs[1][1], T, E, use_fp8=False)  # B, fused
    if rank == slow:
        torch.cuda.synchronize()
        time.sleep(2.0)
        a[4]()  # A's hook, late
    start = time.monotonic()
    buffer.low_latency_dispatch(runs[2][0], runs[2][1], T, E, use_fp8=False)  # C: A's half
    torch.cuda.synchronize()
    took = time.monotonic() - start
    x, idx, w = runs[0]
    out, _, _ = buffer.low_latency_combine(a[0].clone(), idx, w, a[2])
    torch.cuda.synchronize()
    ref = (w * (idx >= 0)).sum(1, keepdim=True) * x.float()
    assert torch.allclose(out.float(), ref, rtol=2 ** -7, atol=1e-5), \
        f"rank {rank}: A's round trip differs by {float((out.float() - ref).abs().max())}"
    if rank != slow:
        assert took > 1.0, f"rank {rank}: C's send did not wait for rank {slow}'s late receive of A ({took:.2f} s)"
