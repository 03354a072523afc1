"""GPU test of the multi-node rail stage (Buffer::internode_rail_exchange, `flashep._C.rail_exchange`),
the first stage of the composed multi-node dispatch (docs/design.md, "Multi-node: the first
version"): every token goes once per destination node to the rank with the same local index there,
over NVSHMEM, and arrives laid out by source node, then token, with the node's local expert ids and
local-rank mask.

One process group per (world size, NVLink domain size): 2 GPUs as 2 nodes of 1; 4 GPUs as 2 x 2 and
4 x 1; 8 GPUs as 2 x 4 and 4 x 2. Every rank checks its forwarded rows against a reference built from
every rank's inputs (all-gathered): bytes of the rows and scales, node-local ids, weights, the local
masks, the sources and the counts; source node a's tokens sit at rows [a * T, a * T + count), the
rows past the count go nowhere. Cases: BF16 and FP8 (column-major scales), top-k or none, 0, 1
and T tokens, random routing, everything to one node, several calls in a row (the sequence) and a
change of shape between calls.

    python3 -m pytest -v -s tests/python/test_internode_rail.py
"""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_harness as dh  # noqa: E402

LAYOUTS = [(2, 1), (4, 2), (4, 1), (8, 4), (8, 2)]  # (world size, NVLink domain size)


@pytest.mark.parametrize("world_size,domain", LAYOUTS, ids=[f"R{r}-M{m}" for r, m in LAYOUTS])
def test_rail_exchange(world_size, domain):
    dh.gpu_count_or_skip(world_size)
    dh.require_nvshmem("the multi-node rail stage needs it")
    dh.run_world(_worker, world_size, args=(domain,), timeout_s=600,
                 env=dh.virtual_nodes_env(domain, FLASHEP_TIMEOUT_S="30"))


CASES = [
    # name, T, n (None: T), H, K, E, fp8, routing
    ("bf16 random", 64, None, 2048, 8, 64, False, "random"),
    ("fp8 random", 64, 37, 7168, 8, 64, True, "random"),
    ("one token", 16, 1, 2048, 4, 32, False, "random"),
    ("no tokens", 16, 0, 2048, 4, 32, True, "random"),
    ("no top-k", 32, None, 4096, 0, 32, False, "mask"),
    ("all to node 0", 48, None, 2048, 8, 64, False, "node0"),
    ("larger T", 256, 200, 4096, 8, 256, True, "random"),
]


def _inputs(case, rank, R, seed):
    import torch
    name, T, n, H, K, E, fp8, routing = case
    n = T if n is None else n
    gen = torch.Generator().manual_seed(seed * 1000 + rank)
    x = torch.randn((n, H), generator=gen).to(torch.bfloat16)
    scales = None
    if fp8:
        scales_rm = torch.rand((n, H // 128), generator=gen) + 0.5
        x = (x.float() / scales_rm.repeat_interleave(128, dim=1)).clamp(-448, 448).to(torch.float8_e4m3fn)
        scales = scales_rm.T.contiguous().T  # column-major, as DeepGEMM wants
    if K > 0:
        if routing == "node0":
            top = max(E * 1 // R, K)  # experts of the first ranks only
            idx = torch.stack([torch.randperm(top, generator=gen)[:K] for _ in range(n)]) if n else torch.empty((0, K), dtype=torch.int64)
        else:
            idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(n)]) if n else torch.empty((0, K), dtype=torch.int64)
        idx = idx.to(torch.int64)
        if n:
            idx[torch.rand((n, K), generator=gen) < 0.1] = -1
        weights = torch.rand((n, K), generator=gen)
        in_rank = torch.zeros((n, R), dtype=torch.bool)
        for t in range(n):
            for e in idx[t].tolist():
                if e >= 0:
                    in_rank[t, e // (E // R)] = True
    else:
        idx, weights = None, None
        in_rank = torch.rand((n, R), generator=gen) < 0.3
    return x, scales, idx, weights, in_rank


def _worker(rank, R, M):
    import torch
    import torch.distributed as dist

    import flashep
    from flashep import _C

    dev = torch.device("cuda", torch.cuda.current_device())
    N = R // M
    node, me = rank // M, rank % M
    size = max(_C.internode_rail_bytes(R, M, case[1], case[3], case[6], case[4]) for case in CASES)
    buffer = flashep.Buffer(dist.group.WORLD, num_nvl_bytes=1 << 20, num_rdma_bytes=size, explicitly_destroy=True)
    assert buffer.nvl_domain_size == M, (buffer.nvl_domain_size, M)
    errors = []
    calls = [(case, seed) for seed in (1, 2) for case in CASES]  # every case twice: the sequence advances
    for case, seed in calls:
        name, T, n, H, K, E, fp8, routing = case
        x, scales, idx, weights, in_rank = _inputs(case, rank, R, seed)
        n = x.size(0)
        # Everyone's inputs, for the reference (padded to T rows).
        mine = {"n": n, "x": x.view(torch.uint8) if fp8 else x.view(torch.uint8), "scales": scales,
                "idx": idx, "weights": weights, "in_rank": in_rank}
        every = [None] * R
        dist.all_gather_object(every, mine)
        xd = x.to(dev)
        sd = scales.to(dev).T.contiguous().T if fp8 else None  # keep column-major on the GPU
        idd = idx.to(dev) if K else None
        wd = weights.to(dev) if K else None
        ird = in_rank.to(dev)
        F = N * T
        slot = torch.empty((max(n, 1), N), dtype=torch.int32, device=dev)
        count = torch.empty((N,), dtype=torch.int32, device=dev)
        fwd_x = torch.zeros((F, H), dtype=torch.uint8 if fp8 else torch.bfloat16, device=dev)
        fwd_scales = torch.zeros((F, H // 128), dtype=torch.float32, device=dev) if fp8 else None
        fwd_idx = torch.full((F, max(K, 1)), -7, dtype=torch.int64, device=dev)
        fwd_w = torch.zeros((F, max(K, 1)), dtype=torch.float32, device=dev)
        fwd_in = torch.zeros((F, M), dtype=torch.bool, device=dev)
        fwd_src = torch.full((F, 2), -1, dtype=torch.int32, device=dev)
        fwd_counts = torch.full((N,), -1, dtype=torch.int32, device=dev)
        stream = torch.cuda.current_stream().cuda_stream
        _C.rail_exchange(buffer.runtime, xd.data_ptr(), fp8, H, sd.data_ptr() if fp8 else 0,
                         sd.stride(0) if fp8 else 0, sd.stride(1) if fp8 else 0, idd.data_ptr() if K else 0,
                         wd.data_ptr() if K else 0, K, E, ird.data_ptr(), n, T, slot.data_ptr(), count.data_ptr(),
                         fwd_x.data_ptr(), fwd_scales.data_ptr() if fp8 else 0, fwd_idx.data_ptr() if K else 0,
                         fwd_w.data_ptr() if K else 0, fwd_in.data_ptr(), fwd_src.data_ptr(), fwd_counts.data_ptr(),
                         0, stream)
        torch.cuda.synchronize()
        buffer.runtime.check()
        # Reference: from source node a, the tokens of rank (a, me) that go to any rank of my node, at
        # rows a * T + k; the other rows go nowhere.
        got_x, got_in, got_src = fwd_x.cpu(), fwd_in.cpu(), fwd_src.cpu()
        got_idx, got_w = fwd_idx.cpu(), fwd_w.cpu()
        got_s = fwd_scales.cpu() if fp8 else None
        L = E // R
        for a in range(N):
            src = a * M + me
            data = every[src]
            expected = [t for t in range(data["n"]) if bool(data["in_rank"][t, node * M:(node + 1) * M].any())]
            if int(fwd_counts[a]) != len(expected):
                errors.append(f"{name} rank {rank}: {int(fwd_counts[a])} tokens from node {a}, expected {len(expected)}")
                break
            for k in range(len(expected), T):
                f = a * T + k
                if bool(got_in[f].any()) or got_src[f].tolist() != [-1, -1] or (K and got_idx[f].tolist() != [-1] * K):
                    errors.append(f"{name} rank {rank}: row {f} past node {a}'s count is not empty")
                    break
            for k, t in enumerate(expected):
                f = a * T + k
                row_ok = torch.equal(got_x[f].view(torch.uint8).flatten(), data["x"][t].flatten())
                if not row_ok:
                    errors.append(f"{name} rank {rank}: row {f} (node {a} token {t}) differs")
                if fp8 and not torch.equal(got_s[f], data["scales"][t]):
                    errors.append(f"{name} rank {rank}: scales of row {f} differ")
                if K:
                    ids = data["idx"][t].tolist()
                    local = [e - node * M * L if e >= 0 and node * M * L <= e < (node + 1) * M * L else -1 for e in ids]
                    if got_idx[f].tolist() != local:
                        errors.append(f"{name} rank {rank}: ids of row {f}: {got_idx[f].tolist()} != {local}")
                    if not torch.equal(got_w[f], data["weights"][t]):
                        errors.append(f"{name} rank {rank}: weights of row {f} differ")
                if not torch.equal(got_in[f], data["in_rank"][t, node * M:(node + 1) * M]):
                    errors.append(f"{name} rank {rank}: local mask of row {f} differs")
                if got_src[f].tolist() != [a, t]:
                    errors.append(f"{name} rank {rank}: source of row {f}: {got_src[f].tolist()} != {[a, t]}")
                if len(errors) > 20:
                    break
        dh.log0(rank, f"[R{R} M{M}] {name} (seed {seed}): {'ok' if not errors else 'FAILED'}")
        dist.barrier()
    torch.cuda.synchronize()
    dist.barrier()
    buffer.destroy()
    assert not errors, "\n".join(errors[:20])
    return True
