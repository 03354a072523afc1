"""Benchmark of the high-throughput path: FP8 dispatch, BF16 dispatch and BF16 combine per shape and
SM count, next to an NCCL all_to_all_single baseline moving the same bytes.

    python3 -m flashep.bench [--num-ranks N] [--sms 8,12,16,24,32] [--shapes all|deepep] [--out FILE]
                             [--nvl-domain-size M]   (M < N: the multi-node path, N/M "nodes" on one host)

One process per GPU (default: every visible GPU), one Buffer sized for every config used. Per shape
(tokens per rank, hidden, top-k, experts; routing: each token picks top-k distinct experts uniformly
at random) and per SM count, with Config(num_sms, send, recv, 6, 256) where send/recv come from
Buffer.get_dispatch_config / get_combine_config:
  * dispatch is timed as the whole call (CPU wait for the counts included), layout computed once
    outside the timing; combine is timed on the handle of the BF16 dispatch;
  * two timings: "call" = CUDA events around one call, ranks aligned by a barrier before each
    (host path included); "stream" = calls back to back with events around each, DeepEP's method
    (for calls that do not wait on the host: cached dispatch FP8/BF16, combine, NCCL); >= 5 warm-up
    iterations then >= 20 timed ones; the median is reported;
  * bandwidth as DeepEP defines it: rows this rank receives (its own included) x row bytes / time,
    an FP8 row counting H + H/128*4 bytes, a BF16 row 2H; combine counts the same rows x 2H;
  * NCCL baseline: all_to_all_single where every rank receives as many bytes as it receives in the
    dispatch, split evenly over the source ranks.
Rank 0 prints one table (time and GB/s of rank 0, GB/s averaged over ranks, NCCL time and GB/s) and
writes it as markdown to --out.
"""
from __future__ import annotations

import os

# NVLink multicast stays off (docs/gpu-machine.md); set before torch/NCCL initialise CUDA.
for _key, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                     ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_key] = _value

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Dict, List, NamedTuple, Optional  # noqa: E402


class Shape(NamedTuple):
    name: str
    tokens: int
    hidden: int
    topk: int
    experts: int


DEEPEP_SHAPE = Shape("4096x7168 top8/256", 4096, 7168, 8, 256)
SHAPES: Dict[str, List[Shape]] = {
    "deepep": [DEEPEP_SHAPE],
    "all": [DEEPEP_SHAPE, Shape("4096x4096 top6/64", 4096, 4096, 6, 64), Shape("8192x2048 top8/128", 8192, 2048, 8, 128)],
}

#: DeepEP V1 on 8 x H200, 24 SMs, the DeepEP shape (docs/gpu-machine.md), for reference.
DEEPEP_REFERENCE = {"dispatch fp8": 320.0, "dispatch bf16": 334.0, "combine bf16": 321.0}


def _parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m flashep.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-ranks", type=int, default=0, help="processes/GPUs (default: all visible GPUs)")
    parser.add_argument("--sms", default="8,12,16,24,32", help="comma-separated SM counts (even)")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="all",
                        help="workloads to run: the DeepEP one, or it and two more (default)")
    parser.add_argument("--out", default=None, help="write the table as markdown to this file")
    parser.add_argument("--warmup", type=int, default=5, help="warm-up iterations (>= 5)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations (>= 20)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before the run is killed")
    parser.add_argument("--nvl-domain-size", type=int, default=0,
                        help="ranks per NVLink domain: below the rank count the multi-node path runs (on one host, "
                             "its 'RDMA' traffic is NVSHMEM over NVLink, not a NIC); default: one domain")
    parser.add_argument("--chunks", default="",
                        help="ring configs to sweep, 'send:recv' comma-separated (both dispatch and combine; "
                             "default: Buffer.get_dispatch_config / get_combine_config)")
    parser.add_argument("--profile", action="store_true",
                        help="also print the kernels of a dispatch (fp8), a cached dispatch (bf16) and a combine "
                             "at the first SM count, from torch.profiler (rank 0)")
    args = parser.parse_args(argv)
    args.sms_list = [int(s) for s in args.sms.split(",") if s.strip()]
    if not args.sms_list or any(s < 2 or s % 2 for s in args.sms_list):
        parser.error(f"--sms needs even SM counts >= 2, got {args.sms!r}")
    args.warmup = max(args.warmup, 5)
    args.iters = max(args.iters, 20)
    args.chunk_list = [tuple(int(v) for v in c.split(":")) for c in args.chunks.split(",") if c.strip()]
    return args


# ---- timing helpers (run inside a rank) ----------------------------------------------------------


def _time_call(torch, dist, fn, warmup: int, iters: int):
    """Median time in us of fn() between CUDA events on the current stream; ranks aligned by a
    barrier before each timed call. Returns (median_us, last result)."""
    result = None
    for _ in range(warmup):
        result = fn()
    torch.cuda.synchronize()
    times = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(iters):
        result = None
        dist.barrier()
        torch.cuda.synchronize()
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times), result


def _time_stream(torch, dist, fn, warmup: int, iters: int):
    """DeepEP's method: calls issued back to back (the GPU never waits for the host between them),
    CUDA events around each; median in us. Only for calls that do not wait on the host (cached
    dispatch, combine, NCCL). Returns (median_us, last result)."""
    result = None
    for _ in range(warmup):
        result = fn()
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        result = fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) * 1000.0 for start, end in events), result


def _print_kernels(torch, dist, rank: int, title: str, calls) -> None:
    """Rank 0 prints the GPU kernels of each call (5 calls each, torch.profiler): where the time goes."""
    from torch.profiler import ProfilerActivity, profile

    for name, fn in calls:
        fn()
        torch.cuda.synchronize()
        dist.barrier()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        if rank == 0:
            totals: Dict[str, List[float]] = {}
            for event in prof.events():
                if event.device_type == torch.autograd.DeviceType.CUDA:
                    totals.setdefault(event.name, []).append(event.time_range.elapsed_us())
            print(f"  kernels of {title} {name} (us per call, 5 calls):", flush=True)
            for kernel, times in sorted(totals.items(), key=lambda kv: -sum(kv[1])):
                print(f"    {sum(times) / 5:9.1f}  x{len(times) // 5:<3d} {kernel[:110]}", flush=True)


def _gbps(num_bytes: float, time_us: float) -> float:
    return num_bytes / time_us / 1e3 if time_us > 0 else 0.0


def _config_fields(cfg) -> tuple:
    return (cfg.num_max_nvl_chunked_send_tokens, cfg.num_max_nvl_chunked_recv_tokens)


def _make_inputs(torch, shape: Shape, rank: int, dev):
    gen = torch.Generator(device=dev)
    gen.manual_seed(20251122 + rank)
    n, H, K, E = shape.tokens, shape.hidden, shape.topk, shape.experts
    x = torch.randn((n, H), generator=gen, dtype=torch.float32, device=dev)
    x_bf16 = x.to(torch.bfloat16)
    # FP8 e4m3 with one float32 scale per 128 channels (amax / 448). Scales column-major
    # (scales.T.contiguous().T), as DeepGEMM wants them and DeepEP's users pass them; the row-major
    # copy of the same values is timed too.
    blocks = x.view(n, H // 128, 128)
    scale = blocks.abs().amax(dim=-1).clamp(min=1e-4) / 448.0
    x_fp8 = (blocks / scale.unsqueeze(-1)).to(torch.float8_e4m3fn).view(n, H)
    scales = scale.t().contiguous().t()
    scales_row_major = scale.contiguous()
    scores = torch.rand((n, E), generator=gen, dtype=torch.float32, device=dev)
    topk_idx = scores.topk(K, dim=1).indices.to(torch.int64).contiguous()  # K distinct experts, uniform
    topk_weights = torch.rand((n, K), generator=gen, dtype=torch.float32, device=dev)
    return x_bf16, (x_fp8, scales), (x_fp8, scales_row_major), topk_idx, topk_weights


def _nccl_baseline(torch, dist, recv_bytes_all: List[int], rank: int, R: int, dev, warmup: int, iters: int):
    """all_to_all_single in which rank r receives recv_bytes_all[r] bytes, evenly from every rank."""
    in_splits = [recv_bytes_all[j] // R for j in range(R)]
    out_splits = [recv_bytes_all[rank] // R] * R
    send = torch.empty((sum(in_splits),), dtype=torch.uint8, device=dev).fill_(1)
    recv = torch.empty((sum(out_splits),), dtype=torch.uint8, device=dev)
    a2a = lambda: dist.all_to_all_single(recv, send, out_splits, in_splits)  # noqa: E731
    t_call, _ = _time_call(torch, dist, a2a, warmup, iters)
    t_stream, _ = _time_stream(torch, dist, a2a, warmup, iters)
    return {"call": (t_call, sum(out_splits)), "stream": (t_stream, sum(out_splits))}


def _worker(rank: int, R: int, args: argparse.Namespace, port: int) -> None:
    if args.nvl_domain_size:
        os.environ["FLASHEP_NVL_DOMAIN_SIZE"] = str(args.nvl_domain_size)
        os.environ.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")  # one host: NVSHMEM over NVLink P2P
    import torch
    import torch.distributed as dist

    import flashep

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=R,
                            device_id=dev)
    shapes = SHAPES[args.shapes]
    base_dispatch = flashep.Buffer.get_dispatch_config(R)
    base_combine = flashep.Buffer.get_combine_config(R)
    if args.chunk_list:
        chunk_pairs = [(c, c) for c in args.chunk_list]
    else:
        chunk_pairs = [(_config_fields(base_dispatch), _config_fields(base_combine))]
    # (sms, (dispatch send, recv), (combine send, recv)) -> (dispatch Config, combine Config)
    configs = {(sms, d, c): (flashep.Config(sms, d[0], d[1], 6, 256), flashep.Config(sms, c[0], c[1], 6, 256))
               for sms in args.sms_list for d, c in chunk_pairs}
    max_hidden_bytes = max(s.hidden for s in shapes) * 2
    num_nvl_bytes = max(c.get_nvl_buffer_size_hint(max_hidden_bytes, R) for pair in configs.values() for c in pair)
    d_send, d_recv = chunk_pairs[0][0]
    c_send, c_recv = chunk_pairs[0][1]
    M = args.nvl_domain_size or R
    num_rdma_bytes = 0
    if M < R:  # the multi-node path: the rail stage of the largest shape, BF16 or FP8
        num_rdma_bytes = max(flashep._C.internode_rail_bytes(R, M, s.tokens, s.hidden, fp8, s.topk)
                             for s in shapes for fp8 in (False, True))
    buffer = flashep.Buffer(dist.group.WORLD, num_nvl_bytes=num_nvl_bytes, num_rdma_bytes=num_rdma_bytes)
    if rank == 0:
        print(f"flashep.bench: {R} ranks on {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, "
              f"buffer {num_nvl_bytes / 2 ** 20:.1f} MiB; dispatch chunks (send {d_send}, recv {d_recv}), "
              f"combine chunks (send {c_send}, recv {c_recv}); warmup {args.warmup}, iters {args.iters}",
              flush=True)

    notes = []  # rank 0: lines printed under the table (multi-node bandwidths)
    records = []  # (shape, op, dtype, scales, timing, sms, chunks, time_us, bytes, nccl_us, nccl_bytes) of this rank
    for shape in shapes:
        H = shape.hidden
        if M < R:  # the rail stage sized for this shape's tokens (every rank the same)
            os.environ["FLASHEP_INTERNODE_MAX_TOKENS"] = str(shape.tokens)
        x_bf16, x_fp8, x_fp8_rows, topk_idx, topk_weights = _make_inputs(torch, shape, rank, dev)
        ntpr, _, ntpe, itir, _ = buffer.get_dispatch_layout(topk_idx, shape.experts)
        layout = dict(num_tokens_per_rank=ntpr, is_token_in_rank=itir, num_tokens_per_expert=ntpe,
                      topk_idx=topk_idx, topk_weights=topk_weights)
        nccl: Dict[str, tuple] = {}
        for (sms, d_chunks, c_chunks), (cfg_d, cfg_c) in configs.items():
            t_fp8, out_fp8 = _time_call(torch, dist, lambda: buffer.dispatch(x_fp8, **layout, config=cfg_d),
                                        args.warmup, args.iters)
            rows = out_fp8[0][0].size(0)
            del out_fp8
            t_bf16, out_bf16 = _time_call(torch, dist, lambda: buffer.dispatch(x_bf16, **layout, config=cfg_d),
                                          args.warmup, args.iters)
            recv_x, _, recv_w, _, handle, _ = out_bf16
            del out_bf16
            # Cached dispatch: the same data movement without the count exchange and host wait, so the
            # difference to the row above is the notify + host round trip. "stream" rows are timed as
            # DeepEP times them (back to back), "call" rows one call at a time from an idle GPU (the
            # host path of the call included).
            t_cached, _ = _time_call(torch, dist, lambda: buffer.dispatch(x_bf16, handle=handle, config=cfg_d),
                                     args.warmup, args.iters)
            t_cached_s, _ = _time_stream(torch, dist, lambda: buffer.dispatch(x_bf16, handle=handle, config=cfg_d),
                                         args.warmup, args.iters)
            t_cached_fp8_s, _ = _time_stream(torch, dist, lambda: buffer.dispatch(x_fp8, handle=handle, config=cfg_d),
                                             args.warmup, args.iters)
            t_cached_fp8_rows_s, _ = _time_stream(
                torch, dist, lambda: buffer.dispatch(x_fp8_rows, handle=handle, config=cfg_d), args.warmup, args.iters)
            combine_fn = lambda: buffer.combine(recv_x, handle, topk_weights=recv_w, config=cfg_c)  # noqa: E731
            t_comb, _ = _time_call(torch, dist, combine_fn, args.warmup, args.iters)
            t_comb_s, _ = _time_stream(torch, dist, combine_fn, args.warmup, args.iters)
            fp8_bytes = rows * (H + H // 128 * 4)
            bf16_bytes = rows * H * 2
            if not nccl:  # the byte counts do not depend on the SM count
                for key, nbytes in (("fp8", fp8_bytes), ("bf16", bf16_bytes)):
                    everyone = [None] * R
                    dist.all_gather_object(everyone, nbytes)
                    nccl[key] = _nccl_baseline(torch, dist, everyone, rank, R, dev, args.warmup, args.iters)
            chunks = f"{d_chunks[0]}:{d_chunks[1]}"
            c_chunks_s = f"{c_chunks[0]}:{c_chunks[1]}"
            for op, dtype, scales, timing, ch, t_us, nbytes in (
                    ("dispatch", "fp8", "col-major", "call", chunks, t_fp8, fp8_bytes),
                    ("dispatch", "bf16", "-", "call", chunks, t_bf16, bf16_bytes),
                    ("dispatch (cached)", "bf16", "-", "call", chunks, t_cached, bf16_bytes),
                    ("combine", "bf16", "-", "call", c_chunks_s, t_comb, bf16_bytes),
                    ("dispatch (cached)", "fp8", "col-major", "stream", chunks, t_cached_fp8_s, fp8_bytes),
                    ("dispatch (cached)", "fp8", "row-major", "stream", chunks, t_cached_fp8_rows_s, fp8_bytes),
                    ("dispatch (cached)", "bf16", "-", "stream", chunks, t_cached_s, bf16_bytes),
                    ("combine", "bf16", "-", "stream", c_chunks_s, t_comb_s, bf16_bytes)):
                records.append((shape.name, op, dtype, scales, timing, sms, ch, t_us, nbytes) + nccl[dtype][timing])
            if M < R:
                # DeepEP's "RDMA" bandwidth: the bytes of the rows that cross to other nodes (once per
                # node), over the call's time. On one host this is NVSHMEM over NVLink. Next to it,
                # what NVSHMEM alone carries: the same BF16 bytes put to the rail peer of the next node
                # by as many blocks as SMs, every rank at once (no flags, no layout).
                nodes = itir.view(itir.size(0), R // M, M).any(-1)
                crossing = int(nodes.sum()) - int(nodes[:, rank // M].sum())
                probe_bytes = max(16, crossing * H * 2 // 16 * 16)
                stream = torch.cuda.current_stream().cuda_stream
                put = lambda: buffer._rt().probe_put_bandwidth((rank + M) % R, probe_bytes, sms, stream)  # noqa: E731
                t_put, _ = _time_stream(torch, dist, put, args.warmup, args.iters)
                if rank == 0:
                    line = (f"{shape.name}, SMs {sms}, chunks {chunks}, {R // M} nodes x {M}: rows crossing nodes "
                            f"(rank 0) {crossing}; 'RDMA' GB/s dispatch fp8 "
                            f"{_gbps(crossing * (H + H // 128 * 4), t_fp8):.1f}, bf16 {_gbps(crossing * H * 2, t_bf16):.1f},"
                            f" cached bf16 {_gbps(crossing * H * 2, t_cached_s):.1f} (stream), combine "
                            f"{_gbps(crossing * H * 2, t_comb):.1f}; raw NVSHMEM put of the same bf16 bytes "
                            f"({probe_bytes / 1e6:.1f} MB, {sms} blocks) {t_put:.1f} us = {_gbps(probe_bytes, t_put):.1f} GB/s")
                    notes.append(line)
                    print("  " + line, flush=True)
            if args.profile and sms == args.sms_list[0] and (d_chunks, c_chunks) == chunk_pairs[0]:
                _print_kernels(torch, dist, rank, f"{shape.name} SMs {sms}", [
                    ("dispatch fp8", lambda: buffer.dispatch(x_fp8, **layout, config=cfg_d)),
                    ("cached dispatch bf16", lambda: buffer.dispatch(x_bf16, handle=handle, config=cfg_d)),
                    ("combine", combine_fn)])
            if rank == 0:
                print(f"  {shape.name} SMs {sms:3d} chunks {chunks}: dispatch fp8 {t_fp8:8.1f} us "
                      f"{_gbps(fp8_bytes, t_fp8):6.1f} GB/s, bf16 {t_bf16:8.1f} us {_gbps(bf16_bytes, t_bf16):6.1f} GB/s, "
                      f"cached bf16 {t_cached:8.1f} us {_gbps(bf16_bytes, t_cached):6.1f} GB/s, combine "
                      f"{t_comb:8.1f} us {_gbps(bf16_bytes, t_comb):6.1f} GB/s; back to back: cached fp8 "
                      f"{_gbps(fp8_bytes, t_cached_fp8_s):6.1f} (row-major scales "
                      f"{_gbps(fp8_bytes, t_cached_fp8_rows_s):6.1f}), cached bf16 {_gbps(bf16_bytes, t_cached_s):6.1f}, "
                      f"combine {_gbps(bf16_bytes, t_comb_s):6.1f} GB/s", flush=True)
            del recv_x, recv_w, handle

    gathered = [None] * R
    dist.all_gather_object(gathered, records)
    if rank == 0:
        table = _table(gathered, R, torch.cuda.get_device_name(dev), shapes)
        if notes:
            table += ("\n\nMulti-node path on one host: its 'RDMA' traffic is NVSHMEM over NVLink, not a NIC. "
                      "'RDMA' GB/s = rows crossing nodes x row bytes / call time (DeepEP's count).\n\n" +
                      "\n".join("* " + line for line in notes))
        print("\n" + table, flush=True)
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                f.write(table + "\n")
            print(f"written to {args.out}", flush=True)
    torch.cuda.synchronize()
    dist.barrier()
    del buffer
    dist.barrier()
    dist.destroy_process_group()


def _table(gathered, R: int, device_name: str, shapes: List[Shape]) -> str:
    header = ["shape", "op", "dtype", "scales", "timing", "SMs", "chunks (send:recv)", "time_us", "GB/s (rank 0)",
              "GB/s (mean)", "nccl_us", "nccl_GB/s"]
    lines = [f"# flashep.bench: {R} x {device_name}",
             "",
             "GB/s as DeepEP defines it: rows received by a rank (its own included) x row bytes / time "
             "(FP8 row H + H/128*4 bytes, BF16 row 2H; combine counts the same rows x 2H). time_us: median "
             "of rank 0. nccl: all_to_all_single moving the same bytes per rank (even splits), timed the same way. "
             "timing 'call': one call at a time from an idle GPU after a barrier (the host path of the call "
             "included; the non-cached dispatch includes its host wait for the counts); 'stream': calls back "
             "to back, events around each (DeepEP's method, no host time).",
             "",
             "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    for i, rec in enumerate(gathered[0]):
        name, op, dtype, scales, timing, sms, chunks, t_us, nbytes, nccl_us, nccl_bytes = rec
        per_rank = [_gbps(g[i][8], g[i][7]) for g in gathered]
        lines.append(f"| {name} | {op} | {dtype} | {scales} | {timing} | {sms} | {chunks} | {t_us:.1f} | "
                     f"{_gbps(nbytes, t_us):.1f} | "
                     f"{statistics.mean(per_rank):.1f} | {nccl_us:.1f} | {_gbps(nccl_bytes, nccl_us):.1f} |")
    if R == 8 and any(s == DEEPEP_SHAPE for s in shapes):
        lines += ["", "Reference (docs/gpu-machine.md), DeepEP V1 on 8 x H200, 24 SMs, the 4096x7168 top8/256 "
                      "shape: " + ", ".join(f"{k} {v:.0f} GB/s" for k, v in DEEPEP_REFERENCE.items()) + "."]
    return "\n".join(lines)


def _child(rank: int, R: int, args: argparse.Namespace, port: int) -> None:
    try:
        _worker(rank, R, args, port)
    except BaseException:
        sys.stderr.write(f"[rank {rank}] flashep.bench failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        os._exit(1)


def main(argv: Optional[List[str]] = None) -> int:
    return launch("flashep.bench", "flashep.bench", _parse_args(argv))


def launch(prog: str, module: str, args: argparse.Namespace) -> int:
    """Runs `module`'s _child on args.num_ranks GPUs (default: all visible) through run_ranks."""
    import importlib

    import torch

    available = torch.cuda.device_count()
    R = args.num_ranks or available
    if R < 1 or R > available:
        print(f"{prog}: --num-ranks {R} but {available} GPUs are visible", file=sys.stderr)
        return 2
    # The children unpickle the target by module name: use the importable one, not __main__.
    return run_ranks(importlib.import_module(module)._child, R, args, args.timeout)


def run_ranks(child, R: int, args: argparse.Namespace, timeout_s: float) -> int:
    """Runs child(rank, R, args, port) in R spawned processes; kills the rest when one fails or the
    time limit passes. Returns the exit status for main()."""
    import multiprocessing

    from .utils import free_tcp_port

    ctx = multiprocessing.get_context("spawn")
    port = free_tcp_port()
    processes = [ctx.Process(target=child, args=(r, R, args, port), daemon=True) for r in range(R)]
    for p in processes:
        p.start()
    deadline = time.monotonic() + timeout_s
    failed_at = None
    while any(p.is_alive() for p in processes):
        time.sleep(0.2)
        now = time.monotonic()
        if failed_at is None and any(p.exitcode not in (None, 0) for p in processes):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + 30):
            hung = [r for r, p in enumerate(processes) if p.is_alive()]
            print(f"flashep bench: killing ranks {hung} "
                  f"({'time limit reached' if now > deadline else 'another rank failed'})", file=sys.stderr)
            for r in hung:
                processes[r].kill()
            break
    for p in processes:
        p.join(10)
    codes = [p.exitcode for p in processes]
    if any(c != 0 for c in codes):
        print(f"flashep bench: FAILED, exit codes by rank: {codes}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
