"""GPU failure behaviour: a peer that never arrives (bounded timeout, clear error, no hang) and bad
inputs (clear ValueError/TypeError/RuntimeError naming the argument, raised before any kernel; the
Buffer stays healthy afterwards). World size 2 (skipped with the reason on fewer GPUs).

    python3 -m pytest -v -s tests/python/test_failures.py
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_harness as dh  # noqa: E402

TIMEOUT_S = 5          # FLASHEP_TIMEOUT_S of the timeout test
MUST_RAISE_WITHIN_S = 20


def _nvl_bytes(deep_ep, R, hidden=7168):
    configs = [deep_ep.Buffer.get_dispatch_config(R), deep_ep.Buffer.get_combine_config(R)]
    return max(c.get_nvl_buffer_size_hint(hidden * 2, R) for c in configs)


def _routing(torch, n, E, K, dev, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    topk = torch.rand((n, E), generator=g, dtype=torch.float32, device="cpu").topk(K, dim=1).indices
    weights = torch.rand((n, K), generator=g, dtype=torch.float32, device="cpu")
    return topk.to(device=dev, dtype=torch.int64).contiguous(), weights.to(dev)


def _roundtrip(buffer, torch, dev, rank, R, n=64, H=2048, E=64, K=4, seed=0):
    """A valid layout + dispatch + combine on every rank; returns a description of what is wrong
    (empty when combine(dispatch(x)) == x * number of receiving ranks)."""
    topk, weights = _routing(torch, n, E, K, dev, seed + rank)
    g = torch.Generator(device="cpu").manual_seed(seed + 100 + rank)
    x = torch.randint(-8, 9, (n, H), generator=g, dtype=torch.int32, device="cpu").to(
        device=dev, dtype=torch.bfloat16)
    ntpr, _, ntpe, itir, _ = buffer.get_dispatch_layout(topk, E)
    recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=itir,
                                                      num_tokens_per_expert=ntpe, topk_idx=topk,
                                                      topk_weights=weights)
    combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
    want = (x.float() * itir.sum(dim=1, keepdim=True).float()).to(torch.bfloat16)
    torch.cuda.synchronize()
    problems = []
    if not torch.equal(combined, want):
        problems.append(f"combined_x wrong in {int((combined != want).sum())} elements")
    if not torch.equal(combined_w, weights):
        problems.append("combined_topk_weights differ from the dispatched weights")
    return "; ".join(problems), (x, topk, weights, ntpr, ntpe, itir, recv_x, recv_w, handle)


# ---- (a) a rank that skips a dispatch ------------------------------------------------------------


@pytest.mark.parametrize("nodes", [1, 2], ids=["one-node", "two-nodes"])
def test_peer_skips_dispatch_times_out(nodes):
    """nodes=2: the 2 GPUs as 2 nodes of 1, the multi-node path (its rail stage waits for the peer);
    needs a build with NVSHMEM."""
    env = {"FLASHEP_TIMEOUT_S": str(TIMEOUT_S)}
    if nodes == 2:
        dh.gpu_count_or_skip(2)
        dh.require_nvshmem("the multi-node path needs it")
        env = dh.virtual_nodes_env(1, **env)
    with tempfile.TemporaryDirectory(prefix="flashep_timeout_") as tmp:
        results = dh.run_world(_timeout_worker, 2, args=(os.path.join(tmp, "rank0_done"), nodes), timeout_s=180,
                               env=env, grace_s=60, exit_grace_s=60)
    print(f"rank 0: {results[0]}")


def _timeout_worker(rank, R, marker, nodes=1):
    import torch
    import torch.distributed as dist

    import flashep as deep_ep

    dev = torch.device("cuda", torch.cuda.current_device())
    rdma = 0 if nodes == 1 else deep_ep._C.internode_rail_bytes(R, R // nodes, 4096, 2048, False, 4)
    buffer = deep_ep.Buffer(dist.group.WORLD, num_nvl_bytes=_nvl_bytes(deep_ep, R), num_rdma_bytes=rdma)
    # One healthy round first: both ranks are up and the buffer works.
    problems, _ = _roundtrip(buffer, torch, dev, rank, R)
    assert not problems, f"the healthy round before the timeout test failed: {problems}"
    dist.barrier()

    if rank != 0:
        # Rank 1 never calls dispatch; it waits until rank 0 is done (bounded), then exits.
        deadline = time.monotonic() + MUST_RAISE_WITHIN_S + 60
        while not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        return "skipped the dispatch"

    topk, weights = _routing(torch, 64, 64, 4, dev, 7)
    x = torch.ones((64, 2048), dtype=torch.bfloat16, device=dev)
    ntpr, _, ntpe, itir, _ = buffer.get_dispatch_layout(topk, 64)
    torch.cuda.synchronize()
    start = time.monotonic()
    error = None
    try:
        buffer.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe,
                        topk_idx=topk, topk_weights=weights)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 (the type is checked below)
        error = e
    elapsed = time.monotonic() - start
    try:
        dh.log_all(rank, f"dispatch without its peer: {type(error).__name__ if error else 'no error'} after "
                         f"{elapsed:.1f} s: {error}")
        assert error is not None, (f"dispatch returned without error after {elapsed:.1f} s although rank 1 never "
                                   "called dispatch")
        assert isinstance(error, RuntimeError), f"expected a RuntimeError, got {type(error).__name__}: {error}"
        message = str(error).lower()
        assert "notify" in message or "dispatch" in message, f"the error does not name the phase: {error}"
        assert "timed out" in message or "timeout" in message, f"the error does not say it timed out: {error}"
        assert elapsed < MUST_RAISE_WITHIN_S, (f"the timeout error came after {elapsed:.1f} s (FLASHEP_TIMEOUT_S="
                                               f"{TIMEOUT_S}, limit {MUST_RAISE_WITHIN_S} s)")
    finally:
        with open(marker, "w") as f:
            f.write("done")
    # The buffer is unusable now; it is dropped when the process exits (the harness fails the test
    # if that hangs or crashes).
    return f"{type(error).__name__} after {elapsed:.1f} s: {error}"


# ---- (a') ranks that disagree on a call ---------------------------------------------------------

MISMATCH_TIMEOUT_S = 60  # FLASHEP_TIMEOUT_S there: the errors must come long before it
MISMATCH_RAISE_WITHIN_S = 10


def test_ranks_that_disagree_fail_fast():
    results = dh.run_world(_mismatch_worker, 2, timeout_s=240, env={"FLASHEP_TIMEOUT_S": str(MISMATCH_TIMEOUT_S)},
                           grace_s=60, exit_grace_s=60)
    print(f"rank 0: {results[0]}")


def _expect_disagreement(rank, what, call, words):
    """Runs `call` (which must fail on every rank: the ranks disagree) and checks the error."""
    start = time.monotonic()
    error = None
    try:
        call()
    except Exception as e:  # noqa: BLE001 (the type is checked below)
        error = e
    elapsed = time.monotonic() - start
    dh.log_all(rank, f"{what}: {type(error).__name__ if error else 'no error'} after {elapsed:.1f} s: {error}")
    assert error is not None, f"{what}: no error although the ranks disagree"
    assert isinstance(error, RuntimeError), f"{what}: expected a RuntimeError, got {type(error).__name__}: {error}"
    message = str(error).lower()
    assert "disagree" in message and "timed out" not in message, f"{what}: not a disagreement error: {error}"
    for word in words:
        assert word in message, f"{what}: the error does not name '{word}': {error}"
    assert elapsed < MISMATCH_RAISE_WITHIN_S, f"{what}: the error came after {elapsed:.1f} s"
    return f"{elapsed:.2f} s"


def _mismatch_worker(rank, R):
    import torch
    import torch.distributed as dist

    import flashep as deep_ep

    dev = torch.device("cuda", torch.cuda.current_device())
    outcomes = []

    # 1. A dispatch whose rows differ (hidden 2048 on rank 0, 4096 on rank 1): caught at the count
    #    exchange, raised by the host wait for the counts.
    buffer = deep_ep.Buffer(dist.group.WORLD, num_nvl_bytes=_nvl_bytes(deep_ep, R))
    problems, _ = _roundtrip(buffer, torch, dev, rank, R)
    assert not problems, f"the healthy round before the mismatch test failed: {problems}"
    topk, weights = _routing(torch, 64, 64, 4, dev, 7 + rank)
    x = torch.ones((64, 2048 if rank == 0 else 4096), dtype=torch.bfloat16, device=dev)
    ntpr, _, ntpe, itir, _ = buffer.get_dispatch_layout(topk, 64)
    torch.cuda.synchronize()
    dist.barrier()

    def dispatch():
        buffer.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe,
                        topk_idx=topk, topk_weights=weights)
        torch.cuda.synchronize()

    outcomes.append("dispatch hidden 2048 vs 4096: " +
                    _expect_disagreement(rank, "dispatch with different hidden sizes", dispatch, ["hidden", "rank"]))
    dist.barrier()
    del buffer  # unusable now
    dist.barrier()

    # 2. A combine with different ring depths (num_max_nvl_chunked_recv_tokens 32 vs 64; the SM
    #    count is checked against the handle on the host already): caught at combine's barrier,
    #    raised by the next call on the buffer (combine does not wait on the host).
    buffer = deep_ep.Buffer(dist.group.WORLD, num_nvl_bytes=_nvl_bytes(deep_ep, R))
    problems, state = _roundtrip(buffer, torch, dev, rank, R, seed=3)
    assert not problems, f"the healthy round before the combine mismatch failed: {problems}"
    recv_x, recv_w, handle = state[6], state[7], state[8]
    num_sms = deep_ep.Buffer.get_combine_config(R).num_sms
    config = deep_ep.Config(num_sms, 4, 32 if rank == 0 else 64, 6, 256)
    torch.cuda.synchronize()
    dist.barrier()

    def combine():
        buffer.combine(recv_x, handle, topk_weights=recv_w, config=config)
        torch.cuda.synchronize()
        buffer.get_dispatch_layout(state[1], 64)  # any call reports the failure of an earlier one

    outcomes.append("combine ring depth 32 vs 64: " +
                    _expect_disagreement(rank, "combine with different ring depths", combine, ["ring depth", "rank"]))
    dist.barrier()
    del buffer
    dist.barrier()

    # 3. A combine whose handle points past x (its rank_prefix_matrix scaled up, on every rank): the
    #    senders refuse before reading a row; the next call raises.
    buffer = deep_ep.Buffer(dist.group.WORLD, num_nvl_bytes=_nvl_bytes(deep_ep, R))
    problems, state = _roundtrip(buffer, torch, dev, rank, R, seed=5)
    assert not problems, f"the healthy round before the bad-handle test failed: {problems}"
    recv_x, recv_w, handle = state[6], state[7], state[8]
    bad_handle = (handle[0] * 4 + 1000,) + tuple(handle[1:])
    torch.cuda.synchronize()
    dist.barrier()

    def combine_bad_handle():
        buffer.combine(recv_x, bad_handle, topk_weights=recv_w)
        torch.cuda.synchronize()
        buffer.get_dispatch_layout(state[1], 64)

    start = time.monotonic()
    error = None
    try:
        combine_bad_handle()
    except Exception as e:  # noqa: BLE001 (checked below)
        error = e
    elapsed = time.monotonic() - start
    dh.log_all(rank, f"combine with a handle past x: {type(error).__name__ if error else 'no error'} after "
                     f"{elapsed:.1f} s: {error}")
    # Every rank's handle is bad, but the first rank to find it aborts the buffer: a rank whose
    # combine kernel starts after that stops at its entry and reports the peer's failure instead.
    assert isinstance(error, RuntimeError), f"combine with a bad handle: expected a RuntimeError, got {error!r}"
    found_here = "handle does not match x" in str(error)
    assert found_here or isinstance(error, deep_ep.FlashepPeerFailedError), \
        f"combine with a bad handle: unexpected error: {error}"
    found = [None] * R
    dist.all_gather_object(found, found_here)
    assert any(found), f"combine with a bad handle: no rank reported the handle itself: {found}"
    assert elapsed < MISMATCH_RAISE_WITHIN_S, f"combine with a bad handle: the error came after {elapsed:.1f} s"
    outcomes.append(f"combine with a handle past x: {elapsed:.2f} s")
    dist.barrier()
    del buffer
    dist.barrier()
    return "; ".join(outcomes)


# ---- (b) bad inputs ------------------------------------------------------------------------------

ALLOWED = (ValueError, TypeError, RuntimeError)


def test_bad_inputs_raise_before_any_kernel():
    results = dh.run_world(_bad_inputs_worker, 2, timeout_s=300,
                           env={"FLASHEP_CHECK_INPUTS": "1", "FLASHEP_TIMEOUT_S": "20"})
    print(f"rank 0 checked {results[0]} bad inputs")


def test_internode_bad_inputs():
    """The multi-node path's own bad inputs, each raised before any kernel, and the buffer still
    works afterwards: an NVSHMEM region too small for the call, more tokens than the rail stage
    holds, a domain size that does not divide the group, a single-node handle."""
    dh.gpu_count_or_skip(2)
    dh.require_nvshmem("the multi-node path needs it")
    results = dh.run_world(_internode_bad_inputs_worker, 2, timeout_s=300,
                           env=dh.virtual_nodes_env(1, FLASHEP_TIMEOUT_S="20"))
    print(f"rank 0 checked {results[0]} bad inputs")


def _internode_bad_inputs_worker(rank, R):
    import torch
    import torch.distributed as dist

    import flashep as deep_ep

    dev = torch.device("cuda", torch.cuda.current_device())
    group = dist.group.WORLD
    expect = _Expect(rank)
    dh.log0(rank, "multi-node bad inputs (each must raise before any kernel):")
    expect("nvl_domain_size that does not divide the group (3 of 2 ranks is one domain; 0 is refused)",
           lambda: deep_ep.Buffer._resolve_nvl_domain_size(4, 3), ["divide"])
    # A region for 64 tokens of H 2048 (top-4): enough for the round trip, too small for more.
    small = deep_ep._C.internode_rail_bytes(R, 1, 64, 2048, False, 4)
    buffer = deep_ep.Buffer(group, num_nvl_bytes=_nvl_bytes(deep_ep, R), num_rdma_bytes=small,
                            explicitly_destroy=True)
    assert buffer.nvl_domain_size == 1, buffer.nvl_domain_size
    problems, state = _roundtrip(buffer, torch, dev, rank, R, seed=3)
    assert not problems, f"the first valid multi-node round failed: {problems}"
    x, topk, weights, ntpr, ntpe, itir, recv_x, recv_w, handle = state
    E = ntpe.size(0)
    big_topk, big_weights = _routing(torch, 256, E, 4, dev, 11 + rank)
    big_x = torch.ones((256, 2048), dtype=torch.bfloat16, device=dev)
    b_ntpr, _, b_ntpe, b_itir, _ = buffer.get_dispatch_layout(big_topk, E)
    expect("more tokens than num_rdma_bytes holds",
           lambda: buffer.dispatch(big_x, num_tokens_per_rank=b_ntpr, is_token_in_rank=b_itir,
                                   num_tokens_per_expert=b_ntpe, topk_idx=big_topk, topk_weights=big_weights),
           ["num_rdma_bytes", "at most", "tokens"])
    wide = torch.ones((x.size(0), 7168 * 2), dtype=torch.bfloat16, device=dev)
    expect("a hidden size that lowers what num_rdma_bytes holds below n",
           lambda: buffer.dispatch(wide, num_tokens_per_rank=ntpr, is_token_in_rank=itir,
                                   num_tokens_per_expert=ntpe, topk_idx=topk, topk_weights=weights),
           ["num_rdma_bytes"])
    expect("cached dispatch with another hidden size than the handle's",
           lambda: buffer.dispatch(x[:, :1024].contiguous(), handle=handle), ["hidden"])
    expect("combine with a single-node style handle (a tuple)",
           lambda: buffer.combine(recv_x, tuple(handle)), ["handle"])
    expect("combine with x of the wrong row count", lambda: buffer.combine(recv_x[:-1], handle),
           ["x", "shape", "rows"])
    torch.cuda.synchronize()
    dist.barrier()
    problems, _ = _roundtrip(buffer, torch, dev, rank, R, seed=4)
    if problems:
        expect.failures.append(f"the round after the bad inputs failed: {problems}")
    buffer.destroy()
    if expect.failures:
        raise AssertionError(f"rank {rank}: " + "; ".join(expect.failures))
    return expect.count


class _Expect:
    def __init__(self, rank):
        self.rank = rank
        self.failures = []
        self.count = 0

    def __call__(self, name, fn, keywords, allowed=ALLOWED):
        """fn() must raise one of `allowed` whose message matches one of `keywords` (regexes, any case)."""
        self.count += 1
        try:
            fn()
        except allowed as error:
            message = str(error)
            if keywords and not any(re.search(k, message, re.IGNORECASE) for k in keywords):
                self.failures.append(f"{name}: {type(error).__name__} message does not mention any of "
                                     f"{keywords}: {message!r}")
            else:
                dh.log0(self.rank, f"  ok   {name}: {type(error).__name__}: {message}")
                return
        except BaseException as error:  # noqa: BLE001
            self.failures.append(f"{name}: raised {type(error).__name__} (expected one of "
                                 f"{[a.__name__ for a in (allowed if isinstance(allowed, tuple) else (allowed,))]}): "
                                 f"{error}")
        else:
            self.failures.append(f"{name}: no error raised")
        dh.log_all(self.rank, "FAILED " + self.failures[-1])


def _bad_inputs_worker(rank, R):
    import torch
    import torch.distributed as dist

    import flashep as deep_ep

    dev = torch.device("cuda", torch.cuda.current_device())
    group = dist.group.WORLD
    buffer = deep_ep.Buffer(group, num_nvl_bytes=_nvl_bytes(deep_ep, R))
    problems, state = _roundtrip(buffer, torch, dev, rank, R, seed=1)
    assert not problems, f"the first valid round failed: {problems}"
    x, topk, weights, ntpr, ntpe, itir, recv_x, recv_w, handle = state
    n, H = x.shape
    E, K = ntpe.size(0), topk.size(1)
    layout = dict(num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe)
    expect = _Expect(rank)
    X = r"\bx\b"

    def dispatch(x_arg=x, **overrides):
        kwargs = dict(layout, topk_idx=topk, topk_weights=weights)
        kwargs.update(overrides)
        return buffer.dispatch(x_arg, **kwargs)

    dh.log0(rank, "bad inputs (each must raise before any kernel):")
    expect("x float32", lambda: dispatch(x.float()), ["dtype", "bfloat16", "bf16", "float32"])
    expect("x 3-D", lambda: dispatch(x.view(n, H // 128, 128)), [X, "shape", "dim", "2-d", "2d"])
    expect("x non-contiguous (x[:, ::2])", lambda: dispatch(x[:, ::2]), ["contiguous", "stride"])
    expect("x transposed", lambda: dispatch(x.t()), ["contiguous", "stride", "shape", "is_token_in_rank"])
    expect("x on the CPU", lambda: dispatch(x.cpu()), ["cuda", "device", "cpu"])
    expect("x rows != is_token_in_rank rows", lambda: dispatch(x[: n - 1]),
           ["is_token_in_rank", "topk_idx", "shape", "token", "row"])
    bad_topk = topk.clone()
    bad_topk[0, 0] = E  # an expert id >= num_experts
    expect("get_dispatch_layout: topk_idx with expert id >= E (FLASHEP_CHECK_INPUTS=1)",
           lambda: buffer.get_dispatch_layout(bad_topk, E), ["topk_idx", "expert", "range", "outside"])
    expect("dispatch: topk_idx with expert id >= E (FLASHEP_CHECK_INPUTS=1)",
           lambda: dispatch(topk_idx=bad_topk), ["topk_idx", "expert", "range", "outside"])
    bad_topk[0, 0] = -2
    expect("get_dispatch_layout: topk_idx with -2", lambda: buffer.get_dispatch_layout(bad_topk, E),
           ["topk_idx", "expert", "range", "outside"])
    expect("topk_idx int32 (layout)", lambda: buffer.get_dispatch_layout(topk.to(torch.int32), E),
           ["topk_idx", "int64", "dtype"])
    expect("topk_idx int32 (dispatch)", lambda: dispatch(topk_idx=topk.to(torch.int32)),
           ["topk_idx", "int64", "dtype"])
    wide = torch.full((n, 33), -1, dtype=torch.int64, device=dev)
    wide[:, 0] = 0
    expect("top-k 33 > 32", lambda: buffer.get_dispatch_layout(wide, E), ["top-?k", "32"])
    expect("topk_weights shape mismatch", lambda: dispatch(topk_weights=weights[:, :-1].contiguous()),
           ["topk_weights"])
    expect("topk_weights float64", lambda: dispatch(topk_weights=weights.double()), ["topk_weights"])
    expect("topk_idx without topk_weights", lambda: dispatch(topk_weights=None), ["topk_weights", "topk_idx"])
    expect("is_token_in_rank wrong shape", lambda: dispatch(is_token_in_rank=itir[:, :1].contiguous()),
           ["is_token_in_rank"])
    expect("num_tokens_per_rank wrong shape",
           lambda: dispatch(num_tokens_per_rank=torch.zeros((R + 1,), dtype=torch.int32, device=dev)),
           ["num_tokens_per_rank"])
    expect("dispatch without layout", lambda: buffer.dispatch(x, topk_idx=topk, topk_weights=weights),
           ["num_tokens_per_rank", "is_token_in_rank", "num_tokens_per_expert", "layout", "handle"])
    odd_e = E + 1
    expect("num_tokens_per_expert with E % R != 0",
           lambda: dispatch(num_tokens_per_expert=torch.zeros((odd_e,), dtype=torch.int32, device=dev)),
           ["num_tokens_per_expert", "num_experts", "experts", "multiple", "divisible"])
    expect("get_dispatch_layout num_experts % R != 0", lambda: buffer.get_dispatch_layout(topk, odd_e),
           ["num_experts", "experts", "multiple", "divisible"])
    fp8 = torch.zeros((n, H), dtype=torch.float8_e4m3fn, device=dev)
    expect("fp8 scales wrong shape",
           lambda: dispatch((fp8, torch.ones((n, H // 128 + 1), dtype=torch.float32, device=dev))), ["scale"])
    expect("fp8 scales float16",
           lambda: dispatch((fp8, torch.ones((n, H // 128), dtype=torch.float16, device=dev))), ["scale"])
    expect("fp8 without scales", lambda: dispatch(fp8), ["dtype", "bfloat16", "bf16", "scale", "float8", "fp8"])
    expect("handle of wrong length (combine)", lambda: buffer.combine(recv_x, handle[:3]), ["handle"])
    wrong_prefix = (torch.zeros((R + 1, R), dtype=torch.int32, device=dev),) + tuple(handle[1:])
    expect("handle with a wrong rank_prefix_matrix (cached dispatch)",
           lambda: buffer.dispatch(x, handle=wrong_prefix), ["handle", "rank_prefix_matrix", "shape"])
    expect("handle with a wrong is_token_in_rank (combine)",
           lambda: buffer.combine(recv_x, tuple(handle[:4]) + (itir[:-1].contiguous(),) + tuple(handle[5:])),
           ["handle", "is_token_in_rank", "send_head", "shape"])
    expect("cached dispatch with topk_idx", lambda: buffer.dispatch(x, handle=handle, topk_idx=topk),
           ["topk", "handle", "cached"])
    if recv_x.size(0) > 0:
        expect("combine x with one row too few", lambda: buffer.combine(recv_x[:-1], handle, topk_weights=recv_w[:-1]),
               [X, "row", "shape", "num_recv", "token", "size"])
    expect("combine x with one row too many",
           lambda: buffer.combine(torch.cat([recv_x, recv_x[:1] if recv_x.size(0) else
                                             torch.zeros((1, H), dtype=torch.bfloat16, device=dev)]), handle),
           [X, "row", "shape", "num_recv", "token", "size"])
    expect("combine x float32", lambda: buffer.combine(recv_x.float(), handle), ["dtype", "bfloat16", "bf16", X])
    expect("combine bias wrong shape",
           lambda: buffer.combine(recv_x, handle, bias=torch.zeros((n + 1, H), dtype=torch.bfloat16, device=dev)),
           ["bias"])
    expect("combine topk_weights wrong rows",
           lambda: buffer.combine(recv_x, handle, topk_weights=torch.zeros((recv_x.size(0) + 1, K),
                                                                           dtype=torch.float32, device=dev)),
           ["topk_weights"])
    expect("config with odd num_sms", lambda: dispatch(config=deep_ep.Config(7, 6, 256, 6, 256)),
           ["num_sms", "even", "sms"])
    expect("config recv chunk < send chunk", lambda: dispatch(config=deep_ep.Config(8, 16, 8, 6, 256)),
           ["chunk", "num_max_nvl"])
    expect("allocate_on_comm_stream without previous_event",
           lambda: dispatch(async_finish=True, allocate_on_comm_stream=True),
           ["previous_event", "allocate_on_comm_stream"])
    expect("allocate_on_comm_stream without async_finish",
           lambda: buffer.get_dispatch_layout(topk, E, previous_event=buffer.capture(), allocate_on_comm_stream=True),
           ["async_finish", "allocate_on_comm_stream"])
    saved_sms = deep_ep.Buffer.num_sms
    try:
        expect("Buffer.set_num_sms(odd)", lambda: deep_ep.Buffer.set_num_sms(23), ["num_sms", "even", "sms"])
    finally:
        if deep_ep.Buffer.num_sms != saved_sms:
            dh.log_all(rank, f"FAILED Buffer.set_num_sms(23) changed Buffer.num_sms to {deep_ep.Buffer.num_sms}")
            expect.failures.append(f"Buffer.set_num_sms(23) changed Buffer.num_sms to {deep_ep.Buffer.num_sms}")
            deep_ep.Buffer.num_sms = saved_sms

    # A buffer too small for the call (collective construction; the dispatch must refuse to run).
    small = deep_ep.Buffer(group, num_nvl_bytes=1 << 20)
    big_x = torch.zeros((n, 7168), dtype=torch.bfloat16, device=dev)
    expect("buffer too small (1 MiB, H=7168)",
           lambda: small.dispatch(big_x, **layout, topk_idx=topk, topk_weights=weights),
           ["num_nvl_bytes", "buffer", "small", "size", "bytes"])
    torch.cuda.synchronize()
    dist.barrier()
    del small
    dist.barrier()

    # (Low-latency bad inputs, a buffer too small for (T, H, R, E) among them, are checked in
    # test_low_latency.py; the mode exists, so constructing one is no longer an error.)

    # The buffer is still healthy: no kernel ran with a bad input and nothing is left half-done.
    torch.cuda.synchronize()
    dist.barrier()
    problems, _ = _roundtrip(buffer, torch, dev, rank, R, seed=2)
    if problems:
        expect.failures.append(f"valid round after the bad inputs: {problems}")
    dh.log0(rank, f"valid round after the bad inputs: {'ok' if not problems else problems}")
    torch.cuda.synchronize()
    dist.barrier()
    del buffer
    dist.barrier()
    if expect.failures:
        raise AssertionError(f"{len(expect.failures)} of {expect.count} bad-input checks failed on rank {rank}:\n"
                             + "\n".join(expect.failures))
    return expect.count
