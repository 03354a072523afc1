"""GPU correctness of the low-latency mode (low_latency_dispatch / low_latency_combine) against the
CPU oracle (flashep._C.oracle_ll_*), on 2, 4 and 8 GPUs, over NVLink stores and (forced) NVSHMEM.

One process group per (world size, transport) runs:
  1. a grid of cases: tokens (n <= T), hidden, top-k, experts, FP8 (round_scale, UE8M0) or BF16,
     hook or not, zero-copy, `out=`, routings (random with masked slots, everything to one expert, a
     rank that sends nothing). Dispatch is checked exactly: recv_count, layout_range (contiguous
     segments, source order), src_info per segment, and every row's payload and scales equal to the
     oracle's cast of the source row. Combine uses expert outputs y = bf16(x_src[t] * c_e) and is
     checked against the oracle within |got - ref| <= 2^-7 * sum_k |w_k * y_k| + 1e-6 (the GPU adds
     per rank in float32, rounds each rank's sum to BF16, then adds the sums: two BF16 roundings);
  2. sequences: two dispatches before their hooks; a CUDA graph of dispatch + combine replayed with
     fresh inputs; a loop of fresh random routings checked on the GPU;
  3. bad inputs, rejected before anything runs.
Failures of peers (a rank that skips a call; shrink mode) are in test_low_latency_failures below.

    python3 -m pytest -v -s tests/python/test_low_latency.py -k R2
Knobs: FLASHEP_TEST_QUICK=1, FLASHEP_TEST_STRESS_ITERS (default 1000, quick 100),
FLASHEP_TEST_GRAPH_REPLAYS (default 100), FLASHEP_TEST_CASES=<regex>.
"""
from __future__ import annotations

import os
import re
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_harness as dh  # noqa: E402

TRANSPORTS = ("nvlink", "nvshmem")
# One rank too: every kernel and host path runs (the rank is its own peer), so a one-GPU machine
# checks them; on 2026-12-01 it caught a host-path bug while no 2-GPU machine was lent.
LL_WORLD_SIZES = (1,) + tuple(dh.WORLD_SIZES)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("world_size", LL_WORLD_SIZES, ids=dh.world_ids(LL_WORLD_SIZES))
def test_low_latency(world_size, transport):
    if transport == "nvshmem":
        _require_nvshmem()
    dh.run_world(_worker, world_size, args=(dh.quick_mode(), transport), timeout_s=900,
                 env={"FLASHEP_TIMEOUT_S": os.environ.get("FLASHEP_TIMEOUT_S", "30"),
                      "NVSHMEM_REMOTE_TRANSPORT": "none"})


@pytest.mark.parametrize("world_size", LL_WORLD_SIZES, ids=dh.world_ids(LL_WORLD_SIZES))
def test_low_latency_with_high_throughput(world_size):
    """One buffer for both modes: high-throughput dispatch/combine, clean_low_latency_buffer, then
    low-latency calls (async_finish, the statistics) and high-throughput again."""
    dh.run_world(_mixed_worker, world_size, timeout_s=600,
                 env={"FLASHEP_TIMEOUT_S": os.environ.get("FLASHEP_TIMEOUT_S", "30")})


@pytest.mark.parametrize("world_size", LL_WORLD_SIZES, ids=dh.world_ids(LL_WORLD_SIZES))
def test_low_latency_logfmt(world_size):
    """use_logfmt=True with the LogFMT-10 wire (the default; FLASHEP_DEBUG_LL_LOGFMT=1): within DeepEP's
    calc_diff < 9e-4 of the oracle, hooked and not, and lossier than the BF16 wire (so the format
    really ran)."""
    dh.run_world(_logfmt_worker, world_size, timeout_s=600,
                 env={"FLASHEP_TIMEOUT_S": os.environ.get("FLASHEP_TIMEOUT_S", "30"), "FLASHEP_DEBUG_LL_LOGFMT": "1"})


def _require_nvshmem():
    dh.require_nvshmem("the forced-NVSHMEM low-latency path is not tested")


class Case:
    def __init__(self, name, T=128, n=None, H=7168, K=8, E=288, fp8=True, round_scale=False, ue8m0=False,
                 hook=False, zero_copy=False, out=False, routing="random", drop=0.1):
        self.name, self.T, self.H, self.K, self.E = name, T, H, K, E
        self.n = T if n is None else n
        self.fp8, self.round_scale, self.ue8m0 = fp8, round_scale, ue8m0
        self.hook, self.zero_copy, self.out = hook, zero_copy, out
        self.routing, self.drop = routing, drop

    def num_experts(self, R):
        return R if self.E == "R" else self.E

    def tokens(self, rank, R):
        return self.n(rank, R) if callable(self.n) else self.n


def _cases(quick):
    cases = [
        Case("default-fp8"),
        Case("fp8-round", round_scale=True),
        Case("fp8-ue8m0", round_scale=True, ue8m0=True),
        Case("bf16", fp8=False),
        Case("hook-fp8", hook=True),
        Case("hook-bf16-zero-copy", fp8=False, hook=True, zero_copy=True),
        Case("zero-copy-out", zero_copy=True, out=True),
        Case("out", out=True, round_scale=True),
        Case("n<T", T=128, n=37),
        # A hook's combine receive with few tokens: each row is added by several blocks (chunks).
        Case("hook-few-tokens", T=128, n=5, hook=True),
        Case("one-token", T=1, n=1),
        Case("T32", T=32),
        Case("T256", T=256, H=4096),
        Case("H2048-k1", H=2048, K=1),
        Case("H4096-E64", H=4096, E=64),
        Case("E=R", E="R", K=1),
        Case("E=R-k2", E="R", K=2, H=2048),
        Case("one-expert", routing="one_expert"),
        Case("rank0-sends-nothing", n=lambda rank, R: 0 if rank == 0 else 100),
        Case("all-masked-slots", routing="random", drop=1.0),
        Case("hook-ue8m0-out", round_scale=True, ue8m0=True, hook=True, out=True, H=4096),
    ]
    if quick:
        keep = {"default-fp8", "bf16", "hook-fp8", "hook-bf16-zero-copy", "n<T", "E=R", "one-expert",
                "rank0-sends-nothing", "fp8-ue8m0", "hook-few-tokens"}
        cases = [c for c in cases if c.name in keep]
    pattern = os.environ.get("FLASHEP_TEST_CASES", "")
    if pattern:
        cases = [c for c in cases if re.search(pattern, c.name)]
    return cases


# ---- inputs (every rank builds every rank's, from the same seeds) ---------------------------------


def _inputs(case, R, seed):
    import torch
    E = case.num_experts(R)
    K = min(case.K, E)  # a token's experts are distinct
    xs, idxs, weights = [], [], []
    for r in range(R):
        g = torch.Generator().manual_seed(seed * 1000 + r)
        n = case.tokens(r, R)
        x = (torch.randn((n, case.H), generator=g) * torch.rand((n, 1), generator=g) * 4).to(torch.bfloat16)
        if case.routing == "one_expert":
            idx = torch.full((n, K), -1, dtype=torch.int64)
            idx[:, 0] = 0
        else:
            idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(n)]) if n else \
                torch.empty((0, K), dtype=torch.int64)
        if case.drop > 0 and n:
            idx[torch.rand((n, K), generator=g) < case.drop] = -1
        w = torch.rand((n, K), generator=g, dtype=torch.float32) + 0.1
        xs.append(x)
        idxs.append(idx.contiguous())
        weights.append(w)
    return xs, idxs, weights, E, K


def _expert_scale(e):
    """c_e: the synthetic expert e multiplies its input by this (exact in BF16)."""
    return 1.0 + (e % 5) * 0.25


# ---- one case -------------------------------------------------------------------------------------


def _run_case(buffer, case, rank, R, seed, errors):
    import torch
    from flashep import _C
    xs, idxs, weights, E, K = _inputs(case, R, seed)
    L, T, H = E // R, case.T, case.H
    dev = torch.device("cuda", torch.cuda.current_device())
    x, idx, w = xs[rank].to(dev), idxs[rank].to(dev), weights[rank].to(dev)
    recv, count, handle, event, hook = buffer.low_latency_dispatch(
        x, idx, T, E, use_fp8=case.fp8, round_scale=case.round_scale, use_ue8m0=case.ue8m0,
        return_recv_hook=case.hook)
    if case.hook:
        assert event.event is None
        hook()
    torch.cuda.synchronize()

    def err(what):
        errors.append(f"[{case.name}] rank {rank}: {what}")
        print(f"MISMATCH [{case.name}] rank {rank}: {what}", file=sys.stderr, flush=True)

    # -- dispatch against the oracle
    routing = _C.oracle_ll_dispatch_routing([i.numpy() for i in idxs], E, T)
    want_count, want_rows = routing[rank]
    got_count = count.cpu().tolist()
    if got_count != list(want_count):
        err(f"recv_count {got_count} != {list(want_count)}")
        return
    src_info, layout_range = handle[0].cpu(), handle[1].cpu()
    recv_x = recv[0] if case.fp8 else recv
    casts = [_C.oracle_ll_cast_fp8(xs[r].view(torch.int16).numpy().view("uint16"), case.round_scale, case.ue8m0)
             if case.fp8 else None for r in range(R)]
    recv_x_cpu = recv_x.cpu()
    scales_cpu = recv[1].cpu() if case.fp8 else None
    for i in range(L):
        ends = []
        for r in range(R):
            begin, n_rows = int(layout_range[i, r]) >> 32, int(layout_range[i, r]) & 0xffffffff
            ends.append((begin, n_rows))
            tokens = src_info[i, begin:begin + n_rows].tolist()
            if sorted(tokens) != list(want_rows[i][r]):
                err(f"expert {i} source {r}: src_info {sorted(tokens)[:8]}... != oracle {list(want_rows[i][r])[:8]}...")
                return
            if n_rows == 0:
                continue
            rows = slice(begin, begin + n_rows)
            tok = torch.tensor(tokens, dtype=torch.int64)
            if case.fp8:
                data, scales = casts[r]
                want = torch.from_numpy(data)[tok]
                if not torch.equal(recv_x_cpu[i, rows].view(torch.uint8), want):
                    err(f"expert {i} source {r}: FP8 payload differs from the oracle's cast")
                    return
                want_s = torch.from_numpy(scales)[tok]
                got_s = scales_cpu[i, rows]
                if not torch.equal(got_s.contiguous().view(torch.int32), want_s.contiguous().view(torch.int32)):
                    err(f"expert {i} source {r}: scales differ from the oracle's")
                    return
            elif not torch.equal(recv_x_cpu[i, rows].view(torch.int16), xs[r][tok].view(torch.int16)):
                err(f"expert {i} source {r}: BF16 payload not exact")
                return
        # segments contiguous, in source order, covering [0, recv_count)
        at = 0
        for begin, n_rows in ends:
            if begin != at:
                err(f"expert {i}: segments not contiguous ({ends})")
                return
            at += n_rows
        if at != got_count[i]:
            err(f"expert {i}: segments cover {at} rows, recv_count {got_count[i]}")
            return

    # -- combine: expert outputs y[i][row] = bf16(x_src[token] * c_e)
    y = torch.zeros((L, R * T, H), dtype=torch.bfloat16, device=dev)
    for i in range(L):
        e = rank * L + i
        for r in range(R):
            begin, n_rows = int(layout_range[i, r]) >> 32, int(layout_range[i, r]) & 0xffffffff
            if n_rows:
                tok = src_info[i, begin:begin + n_rows].to(torch.int64)
                y[i, begin:begin + n_rows] = (xs[r][tok].float() * _expert_scale(e)).to(torch.bfloat16).to(dev)
    target = y
    if case.zero_copy:
        target = buffer.get_next_low_latency_combine_buffer(handle)
        target.copy_(y)
    out = torch.empty((x.size(0), H), dtype=torch.bfloat16, device=dev) if case.out else None
    combined, event, hook = buffer.low_latency_combine(target, idx, w, handle, zero_copy=case.zero_copy,
                                                      return_recv_hook=case.hook, out=out)
    if case.hook:
        hook()
    torch.cuda.synchronize()
    if out is not None and combined.data_ptr() != out.data_ptr():
        err("combine did not return `out`")
    n = x.size(0)
    y_src = torch.zeros((n * K, H), dtype=torch.bfloat16)
    for t in range(n):
        for k in range(K):
            e = int(idxs[rank][t, k])
            if e >= 0:
                y_src[t * K + k] = (xs[rank][t].float() * _expert_scale(e)).to(torch.bfloat16)
    ref = torch.from_numpy(_C.oracle_ll_combine(idxs[rank].numpy(), weights[rank].numpy(),
                                                y_src.view(torch.int16).numpy().view("uint16"), R, E)
                           .view("int16")).view(torch.bfloat16).float() if n else torch.zeros((0, H))
    got = combined.cpu().float()
    terms = (weights[rank].unsqueeze(-1) * y_src.float().view(n, K, H).abs()
             * (idxs[rank] >= 0).unsqueeze(-1)).sum(1) if n else torch.zeros((0, H))
    bound = terms * 2.0 ** -7 + 1e-6
    bad = (got - ref).abs() > bound
    if bool(bad.any()):
        where = bad.nonzero()[0].tolist()
        err(f"combine off by {float((got - ref).abs().max()):.4g} at {where} (bound {float(bound[tuple(where)]):.4g})")


# ---- sequences ------------------------------------------------------------------------------------


def _two_hooks(buffer, rank, R, errors, transport):
    """Hooks out of order and fused calls between a send and its hook: dispatch A (hook), dispatch B
    (fused), hook A; then dispatch C and D (hooks), hook D, hook C; combines likewise; every result
    against sum_k w_k * x (identity experts, BF16)."""
    import torch
    dev = torch.device("cuda", torch.cuda.current_device())
    case = Case("two-hooks", T=64, H=2048, K=4, E=32, fp8=False)
    runs = []
    for seed in (11, 12, 13, 14):
        xs, idxs, weights, E, K = _inputs(case, R, seed)
        runs.append((xs[rank].to(dev), idxs[rank].to(dev), weights[rank].to(dev), E))

    def dispatch(i, hook):
        x, idx, _, E = runs[i]
        return buffer.low_latency_dispatch(x, idx, 64, E, use_fp8=False, return_recv_hook=hook)

    def combine(i, d, hook):
        return buffer.low_latency_combine(d[0].clone(), runs[i][1], runs[i][2], d[2], return_recv_hook=hook)

    def check(i, combined, what):
        x, idx, w, _ = runs[i]
        ref = (w * (idx >= 0)).sum(1, keepdim=True) * x.float()
        if not torch.allclose(combined.float(), ref, rtol=2 ** -7, atol=1e-5):
            errors.append(f"{what} rank {rank}: combine differs by {float((combined.float() - ref).abs().max())}")

    a = dispatch(0, True)
    b = dispatch(1, False)  # fused, between A's send and A's hook
    try:
        combine(0, a, False)
        errors.append(f"rank {rank}: a combine on a handle whose dispatch hook has not run was accepted")
    except RuntimeError:
        pass
    a[4]()
    ca = combine(0, a, True)
    cb = combine(1, b, False)  # fused, between A's combine send and its hook
    ca[2]()
    c = dispatch(2, True)
    d = dispatch(3, True)
    try:
        dispatch(3, False)
        errors.append(f"rank {rank}: a third call with two hooks pending was accepted")
    except RuntimeError:
        pass
    d[4]()  # out of order
    # A call of another region layout (T, H, E) while C's hook is pending would overwrite C's data.
    x_other, idx_other, _, E_other = runs[1]
    try:
        buffer.low_latency_dispatch(x_other, idx_other, 65, E_other, use_fp8=False)
        errors.append(f"rank {rank}: a call of another shape with a hook pending was accepted")
    except ValueError as error:
        if "waiting for its hook" not in str(error):
            errors.append(f"rank {rank}: a call of another shape with a hook pending: wrong error: {error}")
    c[4]()
    cc = combine(2, c, True)
    cd = combine(3, d, True)
    cd[2]()
    cc[2]()
    try:
        cc[2]()
        errors.append(f"rank {rank}: a hook ran twice")
    except RuntimeError:
        pass
    torch.cuda.synchronize()
    for i, result in enumerate((ca, cb, cc, cd)):
        check(i, result[0], f"hooks ({'ABCD'[i]})")
    # Over NVLink a hooked combine uses the per-slot wire: a fused combine two calls later (the same
    # half of the double buffer, the reduced wire) may run before its hook, as the two wires' rows
    # and flags live apart. (Two calls of one wire in one half, with a hook pending, overrun.)
    # (peer_transport is the NVLink domain's; the low-latency path is direct only with the nvlink transport.)
    direct = transport == "nvlink" and all(buffer.runtime.peer_transport(r) in ("nvlink", "self") for r in range(R))
    if direct:
        e = dispatch(0, False)
        ce = combine(0, e, True)   # call s, per-slot
        f = dispatch(1, False)     # call s + 1
        cf = combine(1, f, False)  # call s + 2: the half of s, reduced
        ce[2]()
        torch.cuda.synchronize()
        check(0, ce[0], "a hooked combine with a fused one of its half before its hook (E)")
        check(1, cf[0], "a hooked combine with a fused one of its half before its hook (F)")
        # Every rank late alike: the next call on a hook's wire and half right after the hook. Each
        # rank's send needs the others' credit for the hooked call, which they forward at the entry
        # of that same send: forwarded before the wait, or every rank waits for the others.
        g = dispatch(0, True)
        h = dispatch(1, False)
        g[4]()
        i = dispatch(2, False)       # g's half: needs every rank's receive of g
        j = dispatch(3, True)
        k = dispatch(0, True)        # two hooks pending
        j[4]()
        k[4]()
        m = dispatch(1, False)       # j's half
        cg = combine(0, g, True)
        ch = combine(1, h, True)
        cg[2]()
        ch[2]()
        ci = combine(2, i, True)     # cg's half of the per-slot wire
        ci[2]()
        cm = combine(1, m, False)
        torch.cuda.synchronize()
        for which, (i_run, result) in enumerate(((0, cg), (1, ch), (2, ci), (1, cm))):
            check(i_run, result[0], f"hooks run late on every rank ({'GHIM'[which]})")
        del k
        # A change of shape right after a hook on every rank: the send checks every wire and half.
        n = dispatch(2, True)
        n[4]()
        x_o, idx_o, w_o, E_o = runs[3]
        o = buffer.low_latency_dispatch(x_o, idx_o, 65, E_o, use_fp8=False)  # another T: another layout
        co = buffer.low_latency_combine(o[0].clone(), idx_o, w_o, o[2])
        cn = combine(2, n, False)
        torch.cuda.synchronize()
        check(3, co[0], "a call of another shape after a hook on every rank")
        check(2, cn[0], "back to the first shape")


def _fresh(R, T, H, E, K, seed, dev, rank):
    import torch
    g = torch.Generator(device=dev).manual_seed(seed * 100 + rank)
    n = T
    x = (torch.randint(-8, 9, (n, H), generator=g, device=dev)).to(torch.bfloat16)
    idx = torch.argsort(torch.rand((n, E), generator=g, device=dev), dim=1)[:, :K].to(torch.int64)
    idx[torch.rand((n, K), generator=g, device=dev) < 0.05] = -1
    w = torch.rand((n, K), generator=g, device=dev) + 0.5
    return x, idx.contiguous(), w


def _graph_and_stress(buffer, rank, R, quick, errors):
    """A CUDA graph of dispatch + (identity experts) + combine, replayed with fresh inputs; then a
    loop of fresh routings without graphs. Both check combined == sum_k w_k * x (BF16 dispatch, small
    integers: exact products; bound 2^-7 relative for the two BF16 roundings)."""
    import torch
    dev = torch.device("cuda", torch.cuda.current_device())
    T, H, E, K = 128, 2048, 64, 8

    def check(x, idx, w, combined, what):
        ref = (w * (idx >= 0)).sum(1, keepdim=True) * x.float()
        if not torch.allclose(combined.float(), ref, rtol=2 ** -7, atol=1e-5):
            errors.append(f"{what} rank {rank}: off by {float((combined.float() - ref).abs().max())}")
            return False
        return True

    replays = dh.env_int("FLASHEP_TEST_GRAPH_REPLAYS", 100)
    if replays > 0:
        x, idx, w = _fresh(R, T, H, E, K, 0, dev, rank)
        static_x, static_idx, static_w = x.clone(), idx.clone(), w.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (allocations)
            recv, _, handle, _, _ = buffer.low_latency_dispatch(static_x, static_idx, T, E, use_fp8=False)
            out, _, _ = buffer.low_latency_combine(recv, static_idx, static_w, handle)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            recv, _, handle, _, hook = buffer.low_latency_dispatch(static_x, static_idx, T, E, use_fp8=False,
                                                                  return_recv_hook=True)
            hook()
            y = recv * 1  # the identity expert, inside the graph
            out, _, hook = buffer.low_latency_combine(y, static_idx, static_w, handle, return_recv_hook=True)
            hook()
        for i in range(replays):
            x, idx, w = _fresh(R, T, H, E, K, 1000 + i, dev, rank)
            static_x.copy_(x)
            static_idx.copy_(idx)
            static_w.copy_(w)
            graph.replay()
            torch.cuda.synchronize()
            if not check(x, idx, w, out, f"graph replay {i}"):
                break
        del graph
    iters = dh.env_int("FLASHEP_TEST_STRESS_ITERS", 100 if quick else 1000)
    for i in range(iters):
        x, idx, w = _fresh(R, T, H, E, K, 5000 + i, dev, rank)
        recv, count, handle, _, _ = buffer.low_latency_dispatch(x, idx, T, E, use_fp8=False)
        out, _, _ = buffer.low_latency_combine(recv, idx, w, handle)
        if i % 50 == 49 or i == iters - 1:
            torch.cuda.synchronize()
            if not check(x, idx, w, out, f"stress iteration {i}"):
                break


def _bad_inputs(buffer, rank, R, errors):
    """Each is rejected with ValueError/TypeError/RuntimeError before anything runs."""
    import torch
    dev = torch.device("cuda", torch.cuda.current_device())
    T, H, E = 128, 7168, 288
    x = torch.zeros((8, H), dtype=torch.bfloat16, device=dev)
    idx = torch.zeros((8, 8), dtype=torch.int64, device=dev)
    w = torch.ones((8, 8), dtype=torch.float32, device=dev)
    recv, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, T, E)
    torch.cuda.synchronize()
    y = torch.zeros((E // R, R * T, H), dtype=torch.bfloat16, device=dev)
    bad = {
        "x float32": lambda: buffer.low_latency_dispatch(x.float(), idx, T, E),
        "x not contiguous": lambda: buffer.low_latency_dispatch(x.t().contiguous().t(), idx, T, E),
        "n > T": lambda: buffer.low_latency_dispatch(x, idx, 4, E),
        "H not a multiple of 128": lambda: buffer.low_latency_dispatch(x[:, :100].contiguous(), idx, T, E),
        "K too large": lambda: buffer.low_latency_dispatch(x, torch.zeros((8, 33), dtype=torch.int64, device=dev), T, E),
        "topk_idx int32": lambda: buffer.low_latency_dispatch(x, idx.int(), T, E),
        "E not a multiple of R": lambda: buffer.low_latency_dispatch(x, idx, T, E + 1),
        "buffer too small": lambda: buffer.low_latency_dispatch(x, idx, 4096, E),
        "ue8m0 without round_scale": lambda: buffer.low_latency_dispatch(x, idx, T, E, use_ue8m0=True),
        "hook with async_finish": lambda: buffer.low_latency_dispatch(x, idx, T, E, async_finish=True,
                                                                      return_recv_hook=True),
        "stats of the wrong size": lambda: buffer.low_latency_dispatch(
            x, idx, T, E, cumulative_local_expert_recv_stats=torch.zeros(3, dtype=torch.int32, device=dev)),
        "foreign handle": lambda: buffer.low_latency_combine(y, idx, w, (handle[0], handle[1], T, H, E)),
        "out of the wrong shape": lambda: buffer.low_latency_combine(
            y, idx, w, handle, out=torch.empty((8, H + 128), dtype=torch.bfloat16, device=dev)),
        "x of the wrong shape": lambda: buffer.low_latency_combine(y[:, :10], idx, w, handle),
        "combine top-k differs": lambda: buffer.low_latency_combine(y, idx[:, :4].contiguous(), w[:, :4].contiguous(),
                                                                    handle),
    }
    for name, call in bad.items():
        try:
            call()
            errors.append(f"bad input '{name}' was accepted on rank {rank}")
        except (ValueError, TypeError, RuntimeError):
            pass
    torch.cuda.synchronize()


def _logfmt_worker(rank, world_size):
    import numpy as np
    import torch
    import flashep
    from flashep import _C
    R = world_size
    dev = torch.device("cuda", torch.cuda.current_device())
    full = Case("logfmt", T=128, H=7168, K=8, E=288 if 288 % R == 0 else 64 * R, fp8=False)
    # Few tokens: the combine receive cuts each row into chunks (whole LogFMT groups) over blocks.
    few = Case("logfmt-few-tokens", T=128, n=5, H=7168, K=8, E=full.E, fp8=False)
    buffer = flashep.Buffer(None, 0, flashep.Buffer.get_low_latency_rdma_size_hint(full.T, full.H, R, full.num_experts(R)),
                            low_latency_mode=True, explicitly_destroy=True)
    errors = []
    for case, seed, hook in ((full, 1, False), (full, 2, True), (full, 3, False), (few, 4, True), (few, 5, False)):
        xs, idxs, weights, E, K = _inputs(case, R, seed)
        xs = [(x.float() * 0.02).to(torch.bfloat16) for x in xs]  # partial sums below 1: groups cast
        x, idx, w = xs[rank].to(dev), idxs[rank].to(dev), weights[rank].to(dev)
        recv, _, handle, _, h = buffer.low_latency_dispatch(x, idx, case.T, E, use_fp8=False, return_recv_hook=hook)
        if hook:
            h()
        y = recv.clone()  # identity experts: y_k(t) = x[t]
        outs = {}
        for logfmt in (True, False):
            out, _, h = buffer.low_latency_combine(y, idx, w, handle, use_logfmt=logfmt, return_recv_hook=hook)
            if hook:
                h()
            outs[logfmt] = out
        torch.cuda.synchronize()
        n = x.size(0)
        y_src = torch.zeros((n * K, case.H), dtype=torch.bfloat16)
        for t in range(n):
            for k in range(K):
                if int(idxs[rank][t, k]) >= 0:
                    y_src[t * K + k] = xs[rank][t]
        ref = torch.from_numpy(_C.oracle_ll_combine(idxs[rank].numpy(), weights[rank].numpy(),
                                                    y_src.view(torch.int16).numpy().view("uint16"), R, E)
                               .view("int16")).view(torch.bfloat16).float().flatten().numpy().astype(np.float32)
        diffs = {k: _C.oracle_calc_diff(v.cpu().float().flatten().numpy(), ref) for k, v in outs.items()}
        if not diffs[True] < 9e-4:
            errors.append(f"rank {rank} seed {seed}: LogFMT calc_diff {diffs[True]:.3g} >= 9e-4")
        if not diffs[True] > diffs[False]:
            errors.append(f"rank {rank} seed {seed}: LogFMT no lossier than BF16 ({diffs[True]:.3g} vs "
                          f"{diffs[False]:.3g}): did the format run?")
    buffer.destroy()
    assert not errors, "\n".join(errors)
    return True


def _mixed_worker(rank, world_size):
    import torch
    import flashep
    R = world_size
    dev = torch.device("cuda", torch.cuda.current_device())
    T, H, E, K = 64, 4096, 64, 8
    nvl = max(c.get_nvl_buffer_size_hint(H * 2, R) for c in (flashep.Buffer.get_dispatch_config(R),
                                                                flashep.Buffer.get_combine_config(R)))
    buffer = flashep.Buffer(None, nvl, flashep.Buffer.get_low_latency_rdma_size_hint(T, H, R, E),
                            low_latency_mode=True, explicitly_destroy=True)
    errors = []

    def high_throughput(seed):
        x, idx, w = _fresh(R, T, H, E, K, seed, dev, rank)
        ntpr, _, ntpe, itir, _ = buffer.get_dispatch_layout(idx, E)
        recv_x, _, recv_w, _, handle, _ = buffer.dispatch(x, num_tokens_per_rank=ntpr, is_token_in_rank=itir,
                                                          num_tokens_per_expert=ntpe, topk_idx=idx, topk_weights=w)
        combined, _, _ = buffer.combine(recv_x, handle, topk_weights=recv_w)
        want = (x.float() * itir.sum(1, keepdim=True).float()).to(torch.bfloat16)
        torch.cuda.synchronize()
        if not torch.equal(combined, want):
            errors.append(f"rank {rank}: high-throughput round trip {seed} wrong")

    high_throughput(1)
    buffer.clean_low_latency_buffer(T, H, E)
    L = E // R
    recv_stats = torch.zeros((L,), dtype=torch.int32, device=dev)
    wait_stats = torch.zeros((R,), dtype=torch.int64, device=dev)
    combine_wait = torch.zeros((R,), dtype=torch.int64, device=dev)
    total = torch.zeros((L,), dtype=torch.int32, device=dev)
    for i in range(3):
        x, idx, w = _fresh(R, T, H, E, K, 100 + i, dev, rank)
        recv, count, handle, event, hook = buffer.low_latency_dispatch(
            x, idx, T, E, cumulative_local_expert_recv_stats=recv_stats, dispatch_wait_recv_cost_stats=wait_stats,
            use_fp8=False, async_finish=True)
        assert hook is None and event.event is not None
        event.current_stream_wait()
        total += count
        out, event, _ = buffer.low_latency_combine(recv, idx, w, handle, async_finish=True,
                                                   combine_wait_recv_cost_stats=combine_wait)
        event.current_stream_wait()
        torch.cuda.synchronize()
        ref = (w * (idx >= 0)).sum(1, keepdim=True) * x.float()
        if not torch.allclose(out.float(), ref, rtol=2 ** -7, atol=1e-5):
            errors.append(f"rank {rank}: async low-latency round trip {i} off by {float((out.float() - ref).abs().max())}")
    torch.cuda.synchronize()
    if not torch.equal(recv_stats, total):
        errors.append(f"rank {rank}: cumulative_local_expert_recv_stats {recv_stats.tolist()} != {total.tolist()}")
    if bool((wait_stats < 0).any()) or bool((combine_wait < 0).any()) or int(wait_stats.sum()) == 0:
        errors.append(f"rank {rank}: wait statistics {wait_stats.tolist()} / {combine_wait.tolist()}")
    high_throughput(2)
    buffer.clean_low_latency_buffer(T, H, E)
    x, idx, w = _fresh(R, T, H, E, K, 200, dev, rank)
    recv, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, T, E, use_fp8=False)
    out, _, _ = buffer.low_latency_combine(recv, idx, w, handle)
    torch.cuda.synchronize()
    ref = (w * (idx >= 0)).sum(1, keepdim=True) * x.float()
    if not torch.allclose(out.float(), ref, rtol=2 ** -7, atol=1e-5):
        errors.append(f"rank {rank}: low-latency after the second clean is wrong")
    buffer.destroy()
    assert not errors, "\n".join(errors)
    return True


def _worker(rank, world_size, quick, transport):
    import torch
    import flashep
    R = world_size
    errors = []
    T_max, H_max, E_max = 256, 7168, max(288, 2 * R)
    size = max(flashep.Buffer.get_low_latency_rdma_size_hint(T_max, H_max, R, E_max),
               flashep.Buffer.get_low_latency_rdma_size_hint(128, 7168, R, 288))
    buffer = flashep.Buffer(None, 0, size, low_latency_mode=True,
                            allow_nvlink_for_low_latency_mode=(transport == "nvlink"), explicitly_destroy=True)
    for r in range(R):
        want = "self" if r == rank else transport
        got = buffer.runtime.peer_transport(r) if transport == "nvlink" else want
        assert got in (want, "self"), (r, got)
    for seed, case in enumerate(_cases(quick)):
        start = time.time()
        _run_case(buffer, case, rank, R, seed + 1, errors)
        if rank == 0:
            print(f"[R{R} {transport}] {case.name}: {time.time() - start:.2f} s", flush=True)
    _two_hooks(buffer, rank, R, errors, transport)
    _graph_and_stress(buffer, rank, R, quick, errors)
    _bad_inputs(buffer, rank, R, errors)
    torch.cuda.synchronize()
    buffer.destroy()
    assert not errors, "\n".join(errors[:20])
    return True
