"""GPU correctness of the single-node high-throughput path (get_dispatch_layout, dispatch, combine)
against the CPU oracle (flashep._C.oracle_*), on 2, 4 and 8 GPUs.

One process group per world size runs everything (spawned once by dist_harness.run_world):
  1. a grid of cases (tokens, hidden, top-k, experts, BF16/FP8, scales layout, with/without top-k,
     expert alignment, routing patterns, bias, stream modes, SM counts and chunk sizes, cached and
     worst-case dispatch), each compared field by field and bit for bit with the oracle;
  2. CUDA-graph capture of dispatch(num_worst_tokens=W) + combine, replayed with fresh inputs;
  3. a stress loop of dispatch + combine with fresh random routing every iteration, checked on the
     GPU against x * (number of receiving ranks) with small-integer BF16 x.
Every rank generates every rank's inputs from the same seeds (CPU generators), so each rank computes
the oracle of the whole world and checks its own outputs. Rank 0 prints one line per case with its
time. Mismatches are printed at once (on stderr, with the rank) and collected; the test fails at the
end listing them all.

    python3 -m pytest -v -s tests/python/test_intranode.py          # R2, R4, R8 as GPUs allow
    FLASHEP_TEST_QUICK=1 python3 -m pytest -v -s tests/python/test_intranode.py -k R2
Knobs: FLASHEP_TEST_QUICK=1 (smaller grid), FLASHEP_TEST_CASES=<regex> (run only the cases whose name
matches), FLASHEP_TEST_SKIP_CASES=<regex>, FLASHEP_TEST_GRAPH=0 (no CUDA-graph part),
FLASHEP_TEST_STRESS_ITERS (default 1000, quick 200; 0 = none), FLASHEP_TEST_TIMEOUT_S (harness time
limit), FLASHEP_TIMEOUT_S (flashep's own wait bound, default 60 here).
A flashep exception (rather than a wrong result) stops the world size at once: after one rank raised,
the others may be blocked in a collective call.
"""
from __future__ import annotations

import os
import re
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dist_harness as dh  # noqa: E402

MAX_HIDDEN = 7168
#: (num_sms, nvl send chunk, nvl recv chunk) of the custom configs the cases use.
CUSTOM_CONFIGS = [(24, 6, 256), (8, 4, 32), (32, 8, 128), (2, 1, 8), (8, 6, 256), (24, 4, 32)]


@pytest.mark.parametrize("world_size", dh.WORLD_SIZES, ids=dh.world_ids())
def test_intranode(world_size):
    dh.run_world(_worker, world_size, args=(dh.quick_mode(),), timeout_s=900,
                 env={"FLASHEP_TIMEOUT_S": os.environ.get("FLASHEP_TIMEOUT_S", "60")})


# ---- the case grid -------------------------------------------------------------------------------


class Case:
    """One dispatch (+ cached dispatch) + combine. `n` is an int or a function (rank, R) -> tokens;
    E may be the string 'R' (one expert per rank); K is clipped to E."""

    def __init__(self, name, n=127, H=4096, K=8, E=256, fp8=False, colmajor=False, topk=True, align=1,
                 routing="random", mask=0.1, bias=0, mode="sync", cfg=None, cached=False, worst=False,
                 set_sms=None):
        self.name, self.n, self.H, self.K, self.E = name, n, H, K, E
        self.fp8, self.colmajor, self.topk, self.align = fp8, colmajor, topk, align
        self.routing, self.mask, self.bias, self.mode = routing, mask, bias, mode
        self.cfg, self.cached, self.worst, self.set_sms = cfg, cached, worst, set_sms

    def tokens(self, rank, R):
        return self.n(rank, R) if callable(self.n) else self.n

    def experts(self, R):
        return R if self.E == "R" else self.E

    def num_topk(self, R):
        return min(self.K, self.experts(R))


def _uneven(rank, R):
    return [1, 127, 0, 255, 64, 3, 200, 17][rank % 8]


def build_cases(quick):
    C = Case
    cases = [
        C("empty: n=0 everywhere, H2048 top6/64", n=0, H=2048, K=6, E=64),
        C("n=1 fp8 H7168 top8/256 sm24(6,256)", n=1, H=7168, fp8=True, cfg=(24, 6, 256)),
        C("n=127 bf16 H4096 top6/64 align128 async bias1 sm24(6,256) +cached", K=6, E=64, align=128,
          mode="async", bias=1, cfg=(24, 6, 256), cached=True),
        C("n=127 fp8 col-major scales H7168 top8/256 prev_event bias2 sm8(4,32)", fp8=True, colmajor=True,
          H=7168, mode="prev_event", bias=2, cfg=(8, 4, 32)),
        C("n=127 bf16 H2048 top1/E=R comm_alloc sm2(1,8)", H=2048, K=1, E="R", mode="comm_alloc", cfg=(2, 1, 8)),
        C("n=127 bf16 H7168 top6(<=R)/E=R bias2 sm32(8,128)", H=7168, K=6, E="R", bias=2, cfg=(32, 8, 128)),
        C("n=127 bf16 H4096 top1/64 no mask align128", K=1, E=64, mask=0.0, align=128),
        C("no top-k: bf16 H4096 (routing top6/64) bias1 sm32(8,128)", topk=False, K=6, E=64, bias=1,
          cfg=(32, 8, 128)),
        C("no top-k: fp8 col-major H7168 async +cached", topk=False, fp8=True, colmajor=True, H=7168,
          mode="async", cached=True),
        C("all tokens to one expert: n=512 H2048 top8/64 align128 bias1", n=512, H=2048, K=8, E=64,
          routing="one_expert", align=128, bias=1),
        C("incast (experts 0..5): n=256 fp8 H4096 top6/64 sm8(6,256)", n=256, K=6, E=64, routing="incast",
          fp8=True, cfg=(8, 6, 256)),
        C("last rank n=0, others 300: bf16 H4096 bias2 comm_alloc", n=lambda r, R: 0 if r == R - 1 else 300,
          bias=2, mode="comm_alloc"),
        C("rank 1 all slots -1: n=300 fp8 H2048 top8/256 prev_event", n=300, H=2048, routing="silent_rank",
          fp8=True, mode="prev_event"),
        C("all slots -1 everywhere: n=64 H2048 bias1", n=64, H=2048, routing="all_masked", bias=1),
        C("group-limited (each token in one half of the ranks): n=300 fp8 H7168 top8/256 bias1", n=300, H=7168,
          fp8=True, routing="group_limited", bias=1),
        C("uneven n per rank: fp8 H7168 align128 sm24(4,32) +cached", n=_uneven, fp8=True, H=7168, align=128,
          cfg=(24, 4, 32), cached=True),
        C("worst-case: bf16 n=127 H4096 top8/256 bias1 sm24(6,256)", worst=True, bias=1, cfg=(24, 6, 256)),
        C("worst-case: fp8 col-major n=200 H7168 async", worst=True, n=200, fp8=True, colmajor=True, H=7168,
          mode="async"),
        C("worst-case: uneven n bf16 H2048 top6/64 comm_alloc", worst=True, n=_uneven, H=2048, K=6, E=64,
          mode="comm_alloc"),
        C("default config after Buffer.set_num_sms(24): n=127 bf16 H4096", set_sms=24, bias=1),
    ]
    if quick:
        cases += [
            C("n=1024 bf16 H2048 top8/256 comm_alloc bias2 sm32(8,128) +cached", n=1024, H=2048,
              mode="comm_alloc", bias=2, cfg=(32, 8, 128), cached=True),
        ]
    else:
        cases += [
            C("n=4096 bf16 H2048 top8/256 comm_alloc bias2 sm32(8,128) +cached", n=4096, H=2048,
              mode="comm_alloc", bias=2, cfg=(32, 8, 128), cached=True),
            C("n=4096 fp8 col-major H7168 top8/256 default config +cached", n=4096, H=7168, fp8=True,
              colmajor=True, cached=True),
            C("n=4096 no top-k bf16 H4096 (routing top6/64) sm24(4,32)", n=4096, K=6, E=64, topk=False,
              cfg=(24, 4, 32)),
            C("n=4096 bf16 H2048 top6/64 async sm2(1,8)", n=4096, H=2048, K=6, E=64, mode="async", cfg=(2, 1, 8)),
        ]
    return cases


# ---- checks --------------------------------------------------------------------------------------


class Checker:
    """Collects mismatches (printed immediately on stderr) instead of stopping at the first one."""

    def __init__(self, rank, R):
        self.rank, self.R = rank, R
        self.case = ""
        self.failures = []

    def fail(self, what, detail=""):
        message = f"[R{self.R} rank {self.rank}] {self.case}: {what}" + (f": {detail}" if detail else "")
        dh.log_all(self.rank, "MISMATCH " + message)
        self.failures.append(message)

    def true(self, condition, what):
        if not condition:
            self.fail(what)
        return bool(condition)

    def arrays(self, what, got, want, bf16=False, bits=False):
        """Exact comparison of two numpy arrays (bits=True: compare float32 bit patterns)."""
        import numpy as np

        if got is None or want is None:
            if got is not None or want is not None:
                self.fail(what, f"got {'None' if got is None else 'an array'}, expected "
                                f"{'None' if want is None else 'an array'}")
            return
        got, want = np.asarray(got), np.asarray(want)
        if got.shape != want.shape:
            self.fail(what, f"shape {got.shape}, expected {want.shape}")
            return
        if bits and got.dtype == np.float32:
            g, w = got.view(np.uint32), want.view(np.uint32)
        else:
            g, w = got, want
        if np.array_equal(g, w):
            return
        diff = g != w
        where = np.argwhere(diff)
        first = tuple(int(i) for i in where[0])
        detail = f"{int(diff.sum())} of {diff.size} elements differ; first at {first}: got {got[first]!r}, " \
                 f"expected {want[first]!r}"
        if got.ndim >= 2:
            bad_rows = np.nonzero(diff.reshape(diff.shape[0], -1).any(axis=1))[0]
            detail += f"; {len(bad_rows)} of {got.shape[0]} rows differ (first rows {bad_rows[:8].tolist()})"
        if bf16:
            to_f = lambda a: (a.astype(np.uint32) << 16).view(np.float32)  # noqa: E731
            detail += f"; max abs diff {float(np.nanmax(np.abs(to_f(got) - to_f(want)))):.6g}"
        elif got.dtype.kind == "f":
            detail += f"; max abs diff {float(np.nanmax(np.abs(got.astype(np.float64) - want))):.6g}"
        self.fail(what, detail)


# ---- input generation (CPU, identical on every rank) ---------------------------------------------


def _generator(torch, *keys):
    seed = 0x5EED
    for k in keys:
        seed = (seed * 1000003 + int(k)) % (2 ** 61 - 1)
    return torch.Generator(device="cpu").manual_seed(seed)


def gen_routing(torch, case, seed, rank, R):
    n, E, K = case.tokens(rank, R), case.experts(R), case.num_topk(R)
    g = _generator(torch, seed, rank, 1)
    if case.routing in ("random", "silent_rank"):
        scores = torch.rand((n, E), generator=g, dtype=torch.float32, device="cpu")
        idx = scores.topk(K, dim=1).indices.to(torch.int64)  # K distinct experts, uniformly
        if case.mask > 0:
            idx[torch.rand((n, K), generator=g, dtype=torch.float32, device="cpu") < case.mask] = -1
        if case.routing == "silent_rank" and rank == 1 % R:
            idx.fill_(-1)
    elif case.routing == "group_limited":
        # DeepSeek's node-limited routing: every token picks one half of the ranks (on several nodes,
        # half of the nodes), then its top-K experts there; some slots masked as in "random".
        assert R >= 2 and E % 2 == 0 and K <= E // 2, (R, E, K)
        half = torch.randint(0, 2, (n, 1), generator=g, device="cpu")
        scores = torch.rand((n, E), generator=g, dtype=torch.float32, device="cpu")
        in_half = (torch.arange(E, device="cpu").unsqueeze(0) // (E // 2)) == half
        idx = torch.where(in_half, scores, torch.full_like(scores, -1.0)).topk(K, dim=1).indices.to(torch.int64)
        if case.mask > 0:
            idx[torch.rand((n, K), generator=g, dtype=torch.float32, device="cpu") < case.mask] = -1
    elif case.routing == "one_expert":
        idx = torch.full((n, K), -1, dtype=torch.int64, device="cpu")
        idx[:, 0] = E - 1
    elif case.routing == "incast":
        idx = torch.arange(K, dtype=torch.int64, device="cpu").unsqueeze(0).repeat(n, 1)
    elif case.routing == "all_masked":
        idx = torch.full((n, K), -1, dtype=torch.int64, device="cpu")
    else:
        raise ValueError(case.routing)
    weights = torch.rand((n, K), generator=g, dtype=torch.float32, device="cpu")
    return idx.contiguous(), weights


def gen_rank_inputs(torch, case, seed, rank, R):
    """One rank's inputs, on the CPU: x (bf16, or fp8 bytes as uint8), scales (fp8: [n, H/128] view,
    column-major when case.colmajor), topk_idx, topk_weights, bias0/1 (bf16 or None)."""
    n, H = case.tokens(rank, R), case.H
    g = _generator(torch, seed, rank, 2)
    out = {"n": n}
    out["topk_idx"], out["topk_weights"] = gen_routing(torch, case, seed, rank, R)
    if case.fp8:
        raw = torch.randint(0, 254, (n, H), generator=g, dtype=torch.uint8, device="cpu")
        out["x"] = raw + (raw >= 127).to(torch.uint8)  # every byte but the NaNs 0x7F and 0xFF
        if case.colmajor:
            out["scales"] = torch.randn((H // 128, n), generator=g, dtype=torch.float32, device="cpu").t()
        else:
            out["scales"] = torch.randn((n, H // 128), generator=g, dtype=torch.float32, device="cpu")
    else:
        out["x"] = torch.randn((n, H), generator=g, dtype=torch.float32, device="cpu").to(torch.bfloat16)
        out["scales"] = None
    for i in (0, 1):
        out[f"bias{i}"] = (torch.randn((n, H), generator=g, dtype=torch.float32, device="cpu").to(torch.bfloat16)
                           if case.bias > i else None)
    return out


def bf16_np(t):
    """bf16 CPU tensor -> numpy uint16 bits."""
    import torch

    return t.contiguous().view(torch.int16).numpy().view("uint16")


def oracle_inputs(case, world):
    """The oracle's dispatch inputs (numpy) of every rank."""
    import torch

    inputs = []
    for w in world:
        x = w["x"] if case.fp8 else w["x"].view(torch.uint8)
        inputs.append({
            "x": x.numpy(),
            "x_scales": None if w["scales"] is None else w["scales"].contiguous().numpy(),
            "topk_idx": w["topk_idx"].numpy(),
            "topk_weights": w["topk_weights"].numpy() if case.topk else None,
        })
    return inputs


def check_cached_other_dtype(env, case, seed, world, np_in, handle, cfg, K, E, H):
    """A cached dispatch in the other dtype than the handle's (BF16 <-> FP8): what a training step does
    when the forward dispatch is FP8 and the backward's cached dispatch carries BF16 gradients. Its rows
    must equal the oracle's dispatch of the same routing in that dtype, bit for bit."""
    torch, _C, ck, buffer = env.torch, env._C, env.ck, env.buffer
    rank, R, dev = env.rank, env.R, env.dev
    alt_fp8 = not case.fp8
    alt_np = []
    for r, w in enumerate(world):
        g = _generator(torch, seed, r, 7)
        n = w["n"]
        if alt_fp8:
            raw = torch.randint(0, 254, (n, H), generator=g, dtype=torch.uint8, device="cpu")
            x = raw + (raw >= 127).to(torch.uint8)  # no NaN bytes
            scales = torch.randn((n, H // 128), generator=g, dtype=torch.float32, device="cpu")
        else:
            x = torch.randn((n, H), generator=g, dtype=torch.float32, device="cpu").to(torch.bfloat16)
            scales = None
        if r == rank:
            x_arg = (x.to(dev).view(torch.float8_e4m3fn), scales.to(dev)) if alt_fp8 else x.to(dev)
        alt_np.append({"x": (x if alt_fp8 else x.view(torch.uint8)).numpy(),
                       "x_scales": None if scales is None else scales.numpy(),
                       "topk_idx": np_in[r]["topk_idx"], "topk_weights": None})
    want = _C.oracle_dispatch(R, H, 1 if alt_fp8 else 2, alt_fp8, K, E, case.align, alt_np)[rank]
    num_recv = want["num_recv_tokens"]
    again = buffer.dispatch(x_arg, handle=handle, config=cfg, **_stream_kwargs(buffer, case.mode))
    _finish(env, again[5], case.mode)
    what = "cached dispatch in " + ("fp8" if alt_fp8 else "bf16")
    got, got_scales = again[0] if alt_fp8 else (again[0], None)
    ck.arrays(what + " recv_x bytes", got[:num_recv].view(torch.uint8).cpu().numpy(), want["recv_x"])
    if alt_fp8:
        ck.arrays(what + " recv_x_scales", got_scales[:num_recv].cpu().numpy(), want["recv_x_scales"], bits=True)


# The combine input of rank r is derived from its dispatch output (cheap on the GPU and in numpy):
# BF16: the received bits with the low mantissa bits XOR (r + 1) (still finite, different per rank);
# FP8: each byte b mapped to the bf16 bits 0x3C00 | (b & 0x7F) | (b & 0x80) << 8, XOR (r + 1).
def combine_input_gpu(torch, recv_data, fp8, rank):
    if not fp8:
        return (recv_data.view(torch.int16) ^ (rank + 1)).view(torch.bfloat16)
    b = recv_data.view(torch.uint8).to(torch.int32)
    bits = (0x3C00 | (b & 0x7F) | ((b & 0x80) << 8)) ^ (rank + 1)
    bits = torch.where(bits >= 32768, bits - 65536, bits).to(torch.int16)
    return bits.view(torch.bfloat16)


def combine_input_np(np, recv_bytes, fp8, rank, H):
    rows = recv_bytes.shape[0]
    if not fp8:
        return (np.ascontiguousarray(recv_bytes).view(np.uint16).reshape(rows, H) ^ np.uint16(rank + 1))
    b = recv_bytes.astype(np.uint16)
    return ((np.uint16(0x3C00) | (b & np.uint16(0x7F)) | ((b & np.uint16(0x80)) << np.uint16(8)))
            ^ np.uint16(rank + 1)).astype(np.uint16)


# ---- the worker ----------------------------------------------------------------------------------


class Env:
    pass


def _stream_kwargs(buffer, mode):
    if mode == "sync":
        return {}
    if mode == "async":
        return {"async_finish": True}
    if mode == "prev_event":
        return {"previous_event": buffer.capture()}
    if mode == "comm_alloc":
        return {"previous_event": buffer.capture(), "async_finish": True, "allocate_on_comm_stream": True}
    raise ValueError(mode)


def _finish(env, event, mode):
    """What the caller does after a call in `mode`: nothing for synchronous calls, else wait for the
    returned EventOverlap (as a context manager around overlapped work, or explicitly)."""
    if mode == "async":
        with event:
            env.scratch.add_(1)
    elif mode == "comm_alloc":
        event.current_stream_wait()


def _worker(rank, R, quick):
    import numpy as np
    import torch
    import torch.distributed as dist

    import flashep as deep_ep  # drop-in use: the DeepEP V1 name
    from flashep import _C

    env = Env()
    env.np, env.torch, env.dist, env.deep_ep, env._C = np, torch, dist, deep_ep, _C
    env.rank, env.R = rank, R
    env.dev = torch.device("cuda", torch.cuda.current_device())
    env.ck = Checker(rank, R)
    env.scratch = torch.zeros((1,), dtype=torch.float32, device=env.dev)
    ck = env.ck

    ck.case = "module"
    ck.true(deep_ep.topk_idx_t == torch.int64, "flashep.topk_idx_t is not torch.int64")
    ck.true(isinstance(deep_ep.Buffer.is_sm90_compiled(), bool), "Buffer.is_sm90_compiled() is not a bool")

    configs = [deep_ep.Buffer.get_dispatch_config(R), deep_ep.Buffer.get_combine_config(R),
               _C.default_dispatch_config(R, 24), _C.default_combine_config(R, 24)]
    configs += [deep_ep.Config(s, a, b, 6, 256) for (s, a, b) in CUSTOM_CONFIGS]
    num_nvl_bytes = max(c.get_nvl_buffer_size_hint(MAX_HIDDEN * 2, R) for c in configs)
    group = dist.new_group(list(range(R)))
    buffer = deep_ep.Buffer(group, num_nvl_bytes, 0)
    env.buffer = buffer
    ck.true(buffer.rank == rank and buffer.group_size == R, f"buffer.rank/group_size = {buffer.rank}/{buffer.group_size}")
    ck.true(buffer.num_nvl_bytes == num_nvl_bytes, f"buffer.num_nvl_bytes = {buffer.num_nvl_bytes}")
    ck.true(buffer.low_latency_mode is False, "buffer.low_latency_mode is not False")
    dh.log0(rank, f"\n[R{R}] Buffer of {num_nvl_bytes / 2 ** 20:.1f} MiB (max hint over {len(configs)} configs "
                  f"at H={MAX_HIDDEN}); quick={quick}")

    cases = build_cases(quick)
    only = os.environ.get("FLASHEP_TEST_CASES", "").strip()
    skip = os.environ.get("FLASHEP_TEST_SKIP_CASES", "").strip()
    t_all = time.monotonic()
    for i, case in enumerate(cases):
        if (only and not re.search(only, case.name)) or (skip and re.search(skip, case.name)):
            dh.log0(rank, f"[R{R}] case {i + 1:2d}/{len(cases)} SKIPPED (FLASHEP_TEST_CASES/SKIP_CASES)  {case.name}")
            continue
        ck.case = f"case {i + 1} '{case.name}'"
        before = len(ck.failures)
        t0 = time.monotonic()
        run_case(env, case, seed=1000 + i)
        dt = time.monotonic() - t0
        status = "ok" if len(ck.failures) == before else f"MISMATCH ({len(ck.failures) - before})"
        dh.log0(rank, f"[R{R}] case {i + 1:2d}/{len(cases)} {status:>4} {dt:6.2f}s  {case.name}")

    ck.case = "CUDA graph"
    if dh.env_int("FLASHEP_TEST_GRAPH", 1):
        t0 = time.monotonic()
        graph_test(env, replays=2 if quick else 4)
        dh.log0(rank, f"[R{R}] CUDA graph capture + replays: {time.monotonic() - t0:.2f}s")

    ck.case = "stress loop"
    iters = dh.env_int("FLASHEP_TEST_STRESS_ITERS", 200 if quick else 1000)
    t0 = time.monotonic()
    stress_test(env, iters)
    dh.log0(rank, f"[R{R}] stress loop, {iters} x (layout + dispatch + combine): {time.monotonic() - t0:.2f}s")
    dh.log0(rank, f"[R{R}] total {time.monotonic() - t_all:.1f}s, {len(ck.failures)} mismatches on rank 0")

    torch.cuda.synchronize()
    dist.barrier(group=group)
    del buffer, env.buffer
    import gc

    gc.collect()
    dist.barrier(group=group)
    if ck.failures:
        shown = "\n".join(ck.failures[:40])
        more = f"\n... and {len(ck.failures) - 40} more" if len(ck.failures) > 40 else ""
        raise AssertionError(f"{len(ck.failures)} mismatches on rank {rank}:\n{shown}{more}")
    return {"cases": len(cases), "stress_iters": iters}


def run_case(env, case, seed):
    R, deep_ep = env.R, env.deep_ep
    E, K, H = case.experts(R), case.num_topk(R), case.H
    cfg = None if case.cfg is None else deep_ep.Config(case.cfg[0], case.cfg[1], case.cfg[2], 6, 256)
    saved_sms = deep_ep.Buffer.num_sms
    if case.set_sms:
        deep_ep.Buffer.set_num_sms(case.set_sms)
    try:
        _run_case(env, case, seed, cfg, E, K, H)
    finally:
        if case.set_sms:
            deep_ep.Buffer.set_num_sms(saved_sms)


def case_inputs(env, case, seed, E, K, H):
    """A case's inputs of every rank (CPU), the oracle's dispatch of them, and this rank's inputs on
    the GPU. Returns (world, me, n, np_in, outs, want, num_recv, W, rows, topk_dev, weights_dev,
    x_arg): W is the worst-case row count (0 unless case.worst), rows what recv_x must have."""
    torch, _C, rank, R, dev = env.torch, env._C, env.rank, env.R, env.dev
    world = [gen_rank_inputs(torch, case, seed, r, R) for r in range(R)]
    me = world[rank]
    np_in = oracle_inputs(case, world)
    outs = _C.oracle_dispatch(R, H, 1 if case.fp8 else 2, case.fp8, K, E, case.align, np_in)
    want = outs[rank]
    num_recv = want["num_recv_tokens"]
    W = max(1, sum(w["n"] for w in world)) if case.worst else 0
    rows = W if case.worst else num_recv
    topk_dev = me["topk_idx"].to(dev)
    weights_dev = me["topk_weights"].to(dev)
    if case.fp8:
        data = me["x"].to(dev).view(torch.float8_e4m3fn)
        scales = me["scales"].t().to(dev).t() if case.colmajor else me["scales"].to(dev)
        x_arg = (data, scales)
    else:
        x_arg = me["x"].to(dev)
    return world, me, me["n"], np_in, outs, want, num_recv, W, rows, topk_dev, weights_dev, x_arg


def _run_case(env, case, seed, cfg, E, K, H):
    np, torch, _C, ck, buffer = env.np, env.torch, env._C, env.ck, env.buffer
    rank, R, dev, mode = env.rank, env.R, env.dev, case.mode

    (world, me, n, np_in, outs, want, num_recv, W, rows, topk_dev, weights_dev,
     x_arg) = case_inputs(env, case, seed, E, K, H)
    if case.fp8 and case.colmajor and n > 1:
        scales = x_arg[1]
        ck.true(scales.stride() == (1, n), f"test bug: scales strides {scales.stride()} are not column-major")

    # ---- layout
    ntpr, ntp_rdma, ntpe, itir, ev = buffer.get_dispatch_layout(topk_dev, E, **_stream_kwargs(buffer, mode))
    _finish(env, ev, mode)
    o_ntpr, _, o_ntpe, o_itir = _C.oracle_get_dispatch_layout(np_in[rank]["topk_idx"], E, R, R)
    ck.true(ntp_rdma is None, "layout: num_tokens_per_rdma_rank is not None on one node")
    ck.true(ntpr.dtype == torch.int32 and ntpe.dtype == torch.int32 and itir.dtype == torch.bool,
            f"layout dtypes {ntpr.dtype}, {ntpe.dtype}, {itir.dtype}")
    ck.arrays("layout num_tokens_per_rank", ntpr.cpu().numpy(), o_ntpr)
    ck.arrays("layout num_tokens_per_expert", ntpe.cpu().numpy(), o_ntpe)
    ck.arrays("layout is_token_in_rank", itir.cpu().numpy(), o_itir)

    # ---- dispatch
    kwargs = dict(num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe,
                  expert_alignment=case.align, config=cfg)
    if case.topk:
        kwargs.update(topk_idx=topk_dev, topk_weights=weights_dev)
    if case.worst:
        kwargs["num_worst_tokens"] = W
    recv_x, recv_idx, recv_w, per_expert, handle, ev = buffer.dispatch(x_arg, **kwargs,
                                                                       **_stream_kwargs(buffer, mode))
    _finish(env, ev, mode)

    if case.fp8:
        if not (isinstance(recv_x, tuple) and len(recv_x) == 2):
            raise AssertionError(f"{ck.case}: FP8 dispatch returned recv_x of type {type(recv_x)}, "
                                 "expected a (data, scales) tuple")
        recv_data, recv_scales = recv_x
        ck.true(recv_scales.dtype == torch.float32 and recv_scales.is_contiguous()
                and tuple(recv_scales.shape) == (rows, H // 128),
                f"dispatch: recv scales {recv_scales.dtype} {tuple(recv_scales.shape)} contiguous="
                f"{recv_scales.is_contiguous()}, expected float32 ({rows}, {H // 128}) contiguous")
        ck.arrays("dispatch recv_x_scales", recv_scales[:num_recv].cpu().numpy(), want["recv_x_scales"], bits=True)
    else:
        recv_data = recv_x
    want_dtype = torch.float8_e4m3fn if case.fp8 else torch.bfloat16
    if not (recv_data.dtype == want_dtype and tuple(recv_data.shape) == (rows, H)):
        # Nothing below can be compared; stop here (the other ranks are stopped by the harness).
        raise AssertionError(f"{ck.case}: dispatch recv_x is {recv_data.dtype} {tuple(recv_data.shape)}, expected "
                             f"{want_dtype} ({rows}, {H}) (num_recv={num_recv}, num_worst_tokens={W})")
    ck.arrays("dispatch recv_x bytes", recv_data[:num_recv].view(torch.uint8).cpu().numpy(), want["recv_x"])

    if case.topk:
        ck.true(recv_idx is not None and recv_w is not None, "dispatch with top-k returned no recv_topk_idx/weights")
        if recv_idx is not None:
            ck.true(recv_idx.dtype == torch.int64 and tuple(recv_idx.shape) == (rows, K),
                    f"recv_topk_idx {recv_idx.dtype} {tuple(recv_idx.shape)}")
            ck.arrays("dispatch recv_topk_idx", recv_idx[:num_recv].cpu().numpy(), want["recv_topk_idx"])
            if case.worst and rows > num_recv:
                tail = recv_idx[num_recv:]
                ck.true(bool((tail == -1).all()), f"worst-case: recv_topk_idx rows past the real count "
                                                  f"({num_recv}) are not all -1")
        if recv_w is not None:
            ck.true(recv_w.dtype == torch.float32 and tuple(recv_w.shape) == (rows, K),
                    f"recv_topk_weights {recv_w.dtype} {tuple(recv_w.shape)}")
            ck.arrays("dispatch recv_topk_weights", recv_w[:num_recv].cpu().numpy(), want["recv_topk_weights"])
    else:
        ck.true(recv_idx is None and recv_w is None, "dispatch without top-k returned recv_topk_idx/weights")
    if case.worst:
        ck.true(per_expert == [], f"worst-case: num_recv_tokens_per_expert_list is {per_expert!r}, expected []")
    else:
        ck.true(list(per_expert) == list(want["num_recv_tokens_per_expert"]),
                f"num_recv_tokens_per_expert_list {list(per_expert)}, expected {want['num_recv_tokens_per_expert']}")
    ck.true(isinstance(handle, tuple) and len(handle) == 6, f"handle is not a 6-tuple: {type(handle)}")
    ck.arrays("handle[0] rank_prefix_matrix", handle[0].cpu().numpy(), want["rank_prefix_matrix"])
    ck.true(handle[3].size(0) == rows, f"handle[3] recv_src_idx has {handle[3].size(0)} rows, expected {rows}")
    ck.arrays("handle[3] recv_src_idx", handle[3][:num_recv].cpu().numpy(), want["recv_src_idx"])

    # ---- cached dispatch: same layout, no top-k
    if case.cached:
        again = buffer.dispatch(x_arg, handle=handle, config=cfg, **_stream_kwargs(buffer, mode))
        _finish(env, again[5], mode)
        ck.true(all(v is None for v in again[1:5]), "cached dispatch: items 1..4 of the result are not None")
        if case.fp8:
            ck.true(torch.equal(again[0][0].view(torch.uint8), recv_data.view(torch.uint8)),
                    "cached dispatch: recv_x (fp8) differs from the first dispatch")
            ck.true(torch.equal(again[0][1].view(torch.int32), recv_scales.view(torch.int32)),
                    "cached dispatch: recv scales differ from the first dispatch")
        else:
            ck.true(torch.equal(again[0].view(torch.int16), recv_data.view(torch.int16)),
                    "cached dispatch: recv_x differs from the first dispatch")
        del again
        check_cached_other_dtype(env, case, seed, world, np_in, handle, cfg, K, E, H)

    # ---- combine
    cx = combine_input_gpu(torch, recv_data, case.fp8, rank)
    bias_dev = [None if me[f"bias{i}"] is None else me[f"bias{i}"].to(dev) for i in (0, 1)]
    bias_arg = None if case.bias == 0 else (bias_dev[0] if case.bias == 1 else (bias_dev[0], bias_dev[1]))
    comb_w_in = recv_w if case.topk else None
    combined, combined_w, ev = buffer.combine(cx, handle, topk_weights=comb_w_in, bias=bias_arg, config=cfg,
                                              **_stream_kwargs(buffer, mode))
    _finish(env, ev, mode)

    c_in = []
    for r in range(R):
        o = outs[r]
        c_in.append({
            "x": combine_input_np(np, o["recv_x"], case.fp8, r, H),
            "topk_weights": o["recv_topk_weights"] if case.topk else None,
            "bias0": None if world[r]["bias0"] is None else bf16_np(world[r]["bias0"]),
            "bias1": None if world[r]["bias1"] is None else bf16_np(world[r]["bias1"]),
        })
    c_out = _C.oracle_combine(R, H, K, np_in, outs, c_in, num_experts=E)[rank]
    if ck.true(combined.dtype == torch.bfloat16 and tuple(combined.shape) == (n, H),
               f"combine: combined_x {combined.dtype} {tuple(combined.shape)}, expected bf16 ({n}, {H})"):
        ck.arrays("combine combined_x (bf16 bits)", bf16_np(combined.cpu()), c_out["combined_x"], bf16=True)
    if case.topk:
        if ck.true(combined_w is not None, "combine with topk_weights returned combined_topk_weights None"):
            ck.arrays("combine combined_topk_weights", combined_w.cpu().numpy(), c_out["combined_topk_weights"])
    else:
        ck.true(combined_w is None, "combine without topk_weights returned combined_topk_weights")


# ---- CUDA graph ----------------------------------------------------------------------------------


def graph_test(env, replays, multi_node=False):
    """Capture dispatch(num_worst_tokens=W) + combine once; replay with fresh inputs copied into the
    static tensors (layout computed outside the graph); compare each replay with the oracle.
    `multi_node` (test_internode.py): no recv_src_idx in the handle, and combine within two BF16
    roundings (combine_close) instead of bit for bit."""
    np, torch, _C, ck, buffer = env.np, env.torch, env._C, env.ck, env.buffer
    rank, R, dev = env.rank, env.R, env.dev
    case = Case("graph", n=128, H=4096, K=8, E=256, bias=1)
    n, H, K, E = 128, case.H, case.K, case.E
    W = n * R
    s_x = torch.zeros((n, H), dtype=torch.bfloat16, device=dev)
    s_topk = torch.full((n, K), -1, dtype=torch.int64, device=dev)
    s_w = torch.zeros((n, K), dtype=torch.float32, device=dev)
    s_bias = torch.zeros((n, H), dtype=torch.bfloat16, device=dev)
    s_ntpr = torch.zeros((R,), dtype=torch.int32, device=dev)
    s_ntpe = torch.zeros((E,), dtype=torch.int32, device=dev)
    s_itir = torch.zeros((n, R), dtype=torch.bool, device=dev)

    def fill(seed):
        world = [gen_rank_inputs(torch, case, seed, r, R) for r in range(R)]
        me = world[rank]
        s_x.copy_(me["x"].to(dev))
        s_topk.copy_(me["topk_idx"].to(dev))
        s_w.copy_(me["topk_weights"].to(dev))
        s_bias.copy_(me["bias0"].to(dev))
        ntpr, _, ntpe, itir, _ = buffer.get_dispatch_layout(s_topk, E)
        s_ntpr.copy_(ntpr)
        s_ntpe.copy_(ntpe)
        s_itir.copy_(itir)
        return world

    def step():
        recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(
            s_x, num_tokens_per_rank=s_ntpr, is_token_in_rank=s_itir, num_tokens_per_expert=s_ntpe,
            topk_idx=s_topk, topk_weights=s_w, num_worst_tokens=W)
        cx = combine_input_gpu(torch, recv_x, False, rank)
        combined, combined_w, _ = buffer.combine(cx, handle, topk_weights=recv_w, bias=s_bias)
        return recv_x, recv_idx, recv_w, (None if multi_node else handle[3]), combined, combined_w

    fill(seed=7000)
    side = torch.cuda.Stream(device=dev)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    torch.cuda.synchronize()

    for rep in range(replays):
        world = fill(seed=7001 + rep)
        graph.replay()
        torch.cuda.synchronize()
        recv_x, recv_idx, recv_w, src_idx, combined, combined_w = outputs
        np_in = oracle_inputs(case, world)
        outs = _C.oracle_dispatch(R, H, 2, False, K, E, 1, np_in)
        want = outs[rank]
        m = want["num_recv_tokens"]
        saved = ck.case
        ck.case = f"{saved} replay {rep}"
        ck.arrays("graph recv_x", recv_x[:m].view(torch.uint8).cpu().numpy(), want["recv_x"])
        ck.arrays("graph recv_topk_idx", recv_idx[:m].cpu().numpy(), want["recv_topk_idx"])
        ck.true(bool((recv_idx[m:] == -1).all()), f"graph: recv_topk_idx rows past {m} are not all -1")
        ck.arrays("graph recv_topk_weights", recv_w[:m].cpu().numpy(), want["recv_topk_weights"])
        if not multi_node:
            ck.arrays("graph recv_src_idx", src_idx[:m].cpu().numpy(), want["recv_src_idx"])
        c_in = [{"x": combine_input_np(np, o["recv_x"], False, r, H), "topk_weights": o["recv_topk_weights"],
                 "bias0": bf16_np(world[r]["bias0"]), "bias1": None} for r, o in enumerate(outs)]
        c_out = _C.oracle_combine(R, H, K, np_in, outs, c_in, num_experts=E)[rank]
        if multi_node:
            combine_close(env, "graph combined_x", combined, c_in, np_in, outs, R, H, K, E)
        else:
            ck.arrays("graph combined_x", bf16_np(combined.cpu()), c_out["combined_x"], bf16=True)
        ck.arrays("graph combined_topk_weights", combined_w.cpu().numpy(), c_out["combined_topk_weights"])
        ck.case = saved
    del graph, outputs


def combine_close(env, what, combined, c_in, np_in, outs, R, H, K, E):
    """combined (bf16 GPU tensor) within 2^-6 of the oracle's sum of |terms| of the oracle's result:
    the multi-node path rounds each node's partial sum to BF16 before the sum over nodes (two
    roundings instead of one, at most 3 * 2^-8 of that sum apart)."""
    np, _C, ck, rank = env.np, env._C, env.ck, env.rank
    absolute = lambda bits: None if bits is None else (bits & np.uint16(0x7FFF))  # noqa: E731
    c_abs = [{"x": absolute(c["x"]), "topk_weights": None, "bias0": absolute(c["bias0"]), "bias1": absolute(c["bias1"])}
             for c in c_in]
    ref = _C.oracle_combine(R, H, K, np_in, outs, c_in, num_experts=E)[rank]["combined_x"]
    mag = _C.oracle_combine(R, H, K, np_in, outs, c_abs, num_experts=E)[rank]["combined_x"]
    to_f = lambda bits: (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)  # noqa: E731
    err = np.abs(to_f(bf16_np(combined.cpu())) - to_f(ref))
    bad = err > 2.0 ** -6 * to_f(mag) + 1e-6
    ck.true(not bad.any(), f"{what}: {int(bad.sum())} of {bad.size} values outside 2^-6 of the sum of |terms| "
                           f"(max error {float(err.max()) if err.size else 0.0:.4g})")


# ---- stress loop ---------------------------------------------------------------------------------


def stress_test(env, iters):
    """dispatch + combine with fresh random routing (own to each rank), token count and config every
    iteration; combine(dispatch(x)) must equal x * (number of receiving ranks) exactly (small ints),
    combined weights the original weights (0 where -1), and the layout is checked too. All checks
    accumulate on the GPU and are read once at the end."""
    torch, ck, buffer, deep_ep = env.torch, env.ck, env.buffer, env.deep_ep
    rank, R, dev = env.rank, env.R, env.dev
    H, K, E, n_max = 2048, 6, 64, 128
    L = E // R
    configs = [None, deep_ep.Config(8, 4, 32, 6, 256), deep_ep.Config(24, 6, 256, 6, 256)]
    gen = torch.Generator(device=dev)
    gen.manual_seed(4242 + rank)
    # per iteration: wrong is_token_in_rank entries, wrong combined_x elements, wrong weights, rows
    # with a wrong element, first such row, its number of receiving ranks, wrong elements that equal
    # x * (count - 1) (one rank's contribution missing)
    errors = torch.zeros((iters, 7), dtype=torch.int32, device=dev)
    for it in range(iters):
        n = (it * 37 + rank * 11) % (n_max + 1)
        cfg = configs[it % len(configs)]
        scores = torch.rand((n, E), generator=gen, dtype=torch.float32, device=dev)
        topk = scores.topk(K, dim=1).indices
        masked = torch.rand((n, K), generator=gen, dtype=torch.float32, device=dev) < 0.1
        topk = topk.masked_fill(masked, -1).contiguous()
        weights = torch.rand((n, K), generator=gen, dtype=torch.float32, device=dev)
        x = torch.randint(-8, 9, (n, H), generator=gen, dtype=torch.int32, device=dev).to(torch.bfloat16)

        ntpr, _, ntpe, itir, _ = buffer.get_dispatch_layout(topk, E)
        recv_x, _, recv_w, _, handle, _ = buffer.dispatch(
            x, num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe, topk_idx=topk,
            topk_weights=weights, config=cfg)
        combined, combined_w, _ = buffer.combine(recv_x, handle, topk_weights=recv_w, config=cfg)

        valid = topk >= 0
        dest = torch.where(valid, topk // L, torch.zeros_like(topk))
        hits = torch.nn.functional.one_hot(dest, R).to(torch.int32) * valid.unsqueeze(-1).to(torch.int32)
        want_itir = hits.sum(dim=1) > 0
        count = want_itir.sum(dim=1, keepdim=True).to(torch.float32)
        # + 0.0: a token sent nowhere combines to +0.0 (the sum starts at +0), not x * 0 = -0.0.
        want_x = (x.to(torch.float32) * count + 0.0).to(torch.bfloat16)
        want_w = torch.where(valid, weights, torch.zeros_like(weights))
        wrong = combined.view(torch.int16) != want_x.view(torch.int16)
        wrong_rows = wrong.any(dim=1)
        missing_one = wrong & (combined.to(torch.float32) == x.to(torch.float32) * (count - 1))
        errors[it, 0] = (itir != want_itir).sum().to(torch.int32)
        errors[it, 1] = wrong.sum().to(torch.int32)
        errors[it, 2] = (combined_w != want_w).sum().to(torch.int32)
        if n > 0:
            first_row = wrong_rows.to(torch.int32).argmax()
            errors[it, 3] = wrong_rows.sum().to(torch.int32)
            errors[it, 4] = first_row.to(torch.int32)
            errors[it, 5] = count.flatten().index_select(0, first_row.view(1)).reshape(()).to(torch.int32)
            errors[it, 6] = missing_one.sum().to(torch.int32)
    # Every rank runs every iteration whatever happens (the calls are collective); report at the end.
    torch.cuda.synchronize()
    per_iter = errors.cpu()
    bad = torch.nonzero(per_iter[:, :3].sum(dim=1)).flatten().tolist()
    if bad:
        details = []
        for it in bad[:5]:
            e = per_iter[it].tolist()
            details.append(f"iteration {it} (n={(it * 37 + rank * 11) % (n_max + 1)}, H={H}, config "
                           f"{configs[it % len(configs)]}): is_token_in_rank {e[0]} wrong, combined_x {e[1]} "
                           f"elements wrong in {e[3]} rows (first: token {e[4]}, sent to {e[5]} ranks; "
                           f"{e[6]} of the wrong elements equal x * (ranks - 1), i.e. one contribution "
                           f"missing), combined_topk_weights {e[2]} wrong")
        ck.fail(f"{len(bad)} of {iters} iterations wrong", "; ".join(details))
