"""GPU correctness of the multi-node high-throughput path (flashep/internode.py: rail stage over
NVSHMEM, the single-node dispatch inside each node, the reordering; combine back the same way),
against the same CPU oracle as the single-node path: the result does not depend on the path.

Layouts (world size x NVLink domain size, FLASHEP_NVL_DOMAIN_SIZE): 2 GPUs as 2 nodes of 1; 4 as
2 x 2 and 4 x 1; 8 as 2 x 4 and 4 x 2. The case grid is test_intranode's (tokens 0 to 4096, hidden
2048 to 7168, top-k 1 to 8, experts R to 256, BF16 and FP8 with column-major scales, masked slots,
everything to one expert, a silent rank, stream modes, SM counts, cached and worst-case dispatch).
Checks, per rank: the layout (num_tokens_per_rdma_rank too) and the dispatch outputs bit for bit
against the oracle, the handle's two public entries (handle[0] = is_token_in_rank, handle[-4] =
recv_gbl_rank_prefix_sum), the cached dispatch against the first, and combine within
|got - oracle| <= 2^-6 * (the oracle's sum of |terms|) + 1e-6 (the nodes' partial sums are rounded to
BF16 before the sum over nodes: two roundings instead of one, at most 3 * 2^-8 of it); combined_topk_weights
exactly. Then test_intranode's CUDA-graph replays (dispatch with num_worst_tokens + combine) and its
stress loop (1000 iterations of fresh routing, exact with small-integer rows), through this path.

    python3 -m pytest -v -s tests/python/test_internode.py
Knobs: test_intranode's (FLASHEP_TEST_QUICK, FLASHEP_TEST_CASES, FLASHEP_TEST_SKIP_CASES,
FLASHEP_TEST_GRAPH, FLASHEP_TEST_STRESS_ITERS).
"""
from __future__ import annotations

import os
import re
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_harness as dh  # noqa: E402
import test_intranode as ti  # noqa: E402  (the case grid, inputs, oracle helpers and checker)

LAYOUTS = [(2, 1), (4, 2), (4, 1), (8, 4), (8, 2)]  # (world size, NVLink domain size)


@pytest.mark.parametrize("world_size,domain", LAYOUTS, ids=[f"R{r}-M{m}" for r, m in LAYOUTS])
def test_internode(world_size, domain):
    dh.gpu_count_or_skip(world_size)
    dh.require_nvshmem("the multi-node path needs it")
    dh.run_world(_worker, world_size, args=(domain, dh.quick_mode()), timeout_s=1200,
                 env=dh.virtual_nodes_env(domain, FLASHEP_TIMEOUT_S=os.environ.get("FLASHEP_TIMEOUT_S", "60")))


def _worker(rank, R, M, quick):
    import numpy as np
    import torch
    import torch.distributed as dist

    import flashep as deep_ep
    from flashep import _C

    env = ti.Env()
    env.np, env.torch, env.dist, env.deep_ep, env._C = np, torch, dist, deep_ep, _C
    env.rank, env.R, env.M = rank, R, M
    env.dev = torch.device("cuda", torch.cuda.current_device())
    env.ck = ti.Checker(rank, R)
    env.scratch = torch.zeros((1,), dtype=torch.float32, device=env.dev)
    ck = env.ck
    configs = [deep_ep.Buffer.get_dispatch_config(R), deep_ep.Buffer.get_combine_config(R)]
    configs += [deep_ep.Config(s, a, b, 6, 256) for (s, a, b) in ti.CUSTOM_CONFIGS]
    num_nvl_bytes = max(c.get_nvl_buffer_size_hint(ti.MAX_HIDDEN * 2, R) for c in configs)
    num_rdma_bytes = max(_C.internode_rail_bytes(R, M, 4096, ti.MAX_HIDDEN, fp8, 8) for fp8 in (False, True))
    group = dist.new_group(list(range(R)))
    buffer = deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes)
    env.buffer = buffer
    ck.true(buffer.nvl_domain_size == M, f"buffer.nvl_domain_size = {buffer.nvl_domain_size}, expected {M}")
    dh.log0(rank, f"\n[R{R} M{M}] NVLink buffer {num_nvl_bytes / 2 ** 20:.1f} MiB, NVSHMEM region "
                  f"{num_rdma_bytes / 2 ** 20:.1f} MiB; quick={quick}")
    cases = ti.build_cases(quick)
    only = os.environ.get("FLASHEP_TEST_CASES", "").strip()
    skip = os.environ.get("FLASHEP_TEST_SKIP_CASES", "").strip()
    for i, case in enumerate(cases):
        if (only and not re.search(only, case.name)) or (skip and re.search(skip, case.name)):
            continue
        ck.case = f"case {i + 1} '{case.name}'"
        before = len(ck.failures)
        t0 = time.monotonic()
        E, K, H = case.experts(R), case.num_topk(R), case.H
        cfg = None if case.cfg is None else deep_ep.Config(case.cfg[0], case.cfg[1], case.cfg[2], 6, 256)
        saved_sms = deep_ep.Buffer.num_sms
        if case.set_sms:
            deep_ep.Buffer.set_num_sms(case.set_sms)
        try:
            _run_case(env, case, 1000 + i, cfg, E, K, H)
        finally:
            if case.set_sms:
                deep_ep.Buffer.set_num_sms(saved_sms)
        status = "ok" if len(ck.failures) == before else f"MISMATCH ({len(ck.failures) - before})"
        dh.log0(rank, f"[R{R} M{M}] case {i + 1:2d}/{len(cases)} {status:>4} {time.monotonic() - t0:6.2f}s  {case.name}")
    ck.case = "CUDA graph"
    if dh.env_int("FLASHEP_TEST_GRAPH", 1):
        ti.graph_test(env, replays=5 if quick else 20, multi_node=True)
    ck.case = "stress"
    iters = dh.env_int("FLASHEP_TEST_STRESS_ITERS", 200 if quick else 1000)
    if iters:
        ti.stress_test(env, iters)
    torch.cuda.synchronize()
    dist.barrier(group=group)
    if ck.failures:
        raise AssertionError(f"{len(ck.failures)} mismatches on rank {rank}:\n" + "\n".join(ck.failures[:40]))
    return {"cases": len(cases), "stress_iters": iters}


def _run_case(env, case, seed, cfg, E, K, H):
    np, torch, _C, ck, buffer = env.np, env.torch, env._C, env.ck, env.buffer
    rank, R, M, dev, mode = env.rank, env.R, env.M, env.dev, case.mode
    (world, me, n, np_in, outs, want, num_recv, W, rows, topk_dev, weights_dev,
     x_arg) = ti.case_inputs(env, case, seed, E, K, H)

    # ---- layout (multi-node: num_tokens_per_rdma_rank too)
    ntpr, ntp_rdma, ntpe, itir, ev = buffer.get_dispatch_layout(topk_dev, E, **ti._stream_kwargs(buffer, mode))
    ti._finish(env, ev, mode)
    o_ntpr, o_rdma, o_ntpe, o_itir = _C.oracle_get_dispatch_layout(np_in[rank]["topk_idx"], E, R, M)
    ck.arrays("layout num_tokens_per_rank", ntpr.cpu().numpy(), o_ntpr)
    if ck.true(ntp_rdma is not None, "layout: num_tokens_per_rdma_rank is None on several nodes"):
        ck.arrays("layout num_tokens_per_rdma_rank", ntp_rdma.cpu().numpy(), o_rdma)
    ck.arrays("layout num_tokens_per_expert", ntpe.cpu().numpy(), o_ntpe)
    ck.arrays("layout is_token_in_rank", itir.cpu().numpy(), o_itir)

    # ---- dispatch
    kwargs = dict(num_tokens_per_rank=ntpr, num_tokens_per_rdma_rank=ntp_rdma, is_token_in_rank=itir,
                  num_tokens_per_expert=ntpe, expert_alignment=case.align, config=cfg)
    if case.topk:
        kwargs.update(topk_idx=topk_dev, topk_weights=weights_dev)
    if case.worst:
        kwargs["num_worst_tokens"] = W
    recv_x, recv_idx, recv_w, per_expert, handle, ev = buffer.dispatch(x_arg, **kwargs, **ti._stream_kwargs(buffer, mode))
    ti._finish(env, ev, mode)
    recv_data, recv_scales = recv_x if case.fp8 else (recv_x, None)
    want_dtype = torch.float8_e4m3fn if case.fp8 else torch.bfloat16
    if not (recv_data.dtype == want_dtype and tuple(recv_data.shape) == (rows, H)):
        raise AssertionError(f"{ck.case}: dispatch recv_x is {recv_data.dtype} {tuple(recv_data.shape)}, expected "
                             f"{want_dtype} ({rows}, {H})")
    ck.arrays("dispatch recv_x bytes", recv_data[:num_recv].view(torch.uint8).cpu().numpy(), want["recv_x"])
    if case.fp8:
        ck.arrays("dispatch recv_x_scales", recv_scales[:num_recv].cpu().numpy(), want["recv_x_scales"], bits=True)
    if case.topk:
        ck.arrays("dispatch recv_topk_idx", recv_idx[:num_recv].cpu().numpy(), want["recv_topk_idx"])
        ck.arrays("dispatch recv_topk_weights", recv_w[:num_recv].cpu().numpy(), want["recv_topk_weights"])
        if case.worst and rows > num_recv:
            ck.true(bool((recv_idx[num_recv:] == -1).all()), "worst-case: recv_topk_idx past the real count is not -1")
    else:
        ck.true(recv_idx is None and recv_w is None, "dispatch without top-k returned recv_topk_idx/weights")
    if case.worst:
        ck.true(per_expert == [], f"worst-case: num_recv_tokens_per_expert_list is {per_expert!r}")
    else:
        ck.true(list(per_expert) == list(want["num_recv_tokens_per_expert"]),
                f"num_recv_tokens_per_expert_list {list(per_expert)}, expected {want['num_recv_tokens_per_expert']}")
    ck.true(isinstance(handle, tuple) and len(handle) == 10, f"handle is not a 10-tuple: {type(handle)}")
    ck.true(torch.equal(handle[0].cpu(), itir.cpu()), "handle[0] is not is_token_in_rank")
    ck.arrays("handle[-4] recv_gbl_rank_prefix_sum", handle[-4].cpu().numpy(),
              np.asarray(want["rank_prefix_matrix"])[:, rank])

    if case.cached:
        again = buffer.dispatch(x_arg, handle=handle, config=cfg, **ti._stream_kwargs(buffer, mode))
        ti._finish(env, again[5], mode)
        ck.true(all(v is None for v in again[1:5]), "cached dispatch: items 1..4 of the result are not None")
        got = again[0][0] if case.fp8 else again[0]
        ck.true(torch.equal(got[:num_recv].view(torch.uint8), recv_data[:num_recv].view(torch.uint8)),
                "cached dispatch: recv_x differs from the first dispatch")
        ti.check_cached_other_dtype(env, case, seed, world, np_in, handle, cfg, K, E, H)

    # ---- combine, within the bound of two BF16 roundings
    cx = ti.combine_input_gpu(torch, recv_data, case.fp8, rank)
    bias_dev = [None if me[f"bias{i}"] is None else me[f"bias{i}"].to(dev) for i in (0, 1)]
    bias_arg = None if case.bias == 0 else (bias_dev[0] if case.bias == 1 else (bias_dev[0], bias_dev[1]))
    combined, combined_w, ev = buffer.combine(cx, handle, topk_weights=recv_w if case.topk else None, bias=bias_arg,
                                              config=cfg, **ti._stream_kwargs(buffer, mode))
    ti._finish(env, ev, mode)
    c_in = []
    for r in range(R):
        o = outs[r]
        c_in.append({"x": ti.combine_input_np(np, o["recv_x"], case.fp8, r, H),
                     "topk_weights": o["recv_topk_weights"] if case.topk else None,
                     "bias0": None if world[r]["bias0"] is None else ti.bf16_np(world[r]["bias0"]),
                     "bias1": None if world[r]["bias1"] is None else ti.bf16_np(world[r]["bias1"])})
    ref = _C.oracle_combine(R, H, K, np_in, outs, c_in, num_experts=E)[rank]
    if ck.true(combined.dtype == torch.bfloat16 and tuple(combined.shape) == (n, H),
               f"combine: combined_x {combined.dtype} {tuple(combined.shape)}, expected bf16 ({n}, {H})"):
        ti.combine_close(env, "combine combined_x", combined, c_in, np_in, outs, R, H, K, E)
    if case.topk:
        if ck.true(combined_w is not None, "combine with topk_weights returned combined_topk_weights None"):
            ck.arrays("combine combined_topk_weights", combined_w.cpu().numpy(), ref["combined_topk_weights"])
