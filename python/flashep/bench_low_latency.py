"""Benchmark of the low-latency mode: FP8 dispatch and BF16 combine at decode batch sizes, over
NVLink stores and over NVSHMEM (forced), next to an NCCL all_to_all_single of the same bytes.

    python3 -m flashep.bench_low_latency [--num-ranks N] [--tokens 1,32,128,256] [--paths nvlink,nvshmem]
                                         [--hidden 7168] [--topk 8] [--experts 288] [--out FILE]

One process per GPU (default: every visible GPU). Per path and token count T (every rank sends T
tokens, num_max_dispatch_tokens_per_rank = T; each token picks top-k distinct experts uniformly at
random), measured the way DeepEP's users read it:
  * kernel times from torch.profiler over 30 calls, each after a large GEMM and an all-reduce (the
    kernels are named flashep::ll::dispatch / flashep::ll::combine);
  * with the receive hook: the send and receive phases (the send-only and receive-only
    instantiations of the same kernel);
  * a dispatch + combine loop timed with CUDA events (calls back to back; median per iteration);
  * bandwidth as DeepEP defines it: (token, expert) pairs this rank sends x (H + H/128*4 + 16) bytes
    for FP8 dispatch, x 2H for combine, over the kernel time;
  * NCCL: all_to_all_single moving the same bytes per rank (even splits), CUDA events, median;
  * the buffer bytes per GPU (get_low_latency_rdma_size_hint).
Rank 0 prints one table (medians of rank 0) and writes it as markdown to --out.
"""
from __future__ import annotations

import os

for _key, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                     ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_key] = _value
os.environ.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")  # one host: NVSHMEM over NVLink P2P

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import List, Optional  # noqa: E402

from .bench import _gbps, _nccl_baseline, _time_stream, launch  # noqa: E402

PROFILED_CALLS = 30

#: DeepEP V1 on 2 x H200, 128 tokens, H 7168, top-8 of 288 (issue 8), kernel times in us.
DEEPEP_REFERENCE_2GPU = {"dispatch": 28.5, "combine": 40.3, "dispatch send": 20.0, "dispatch recv": 8.0,
                         "combine send": 32.4, "combine recv": 9.6, "dispatch+combine": 71.0, "buffer MB": 2147}


def _parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python3 -m flashep.bench_low_latency", description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-ranks", type=int, default=0, help="processes/GPUs (default: all visible)")
    parser.add_argument("--tokens", default="1,32,128,256", help="tokens per rank, comma-separated")
    parser.add_argument("--paths", default="nvlink,nvshmem", help="nvlink and/or nvshmem (forced)")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=288)
    parser.add_argument("--iters", type=int, default=50, help="timed iterations of the loop")
    parser.add_argument("--out", default="", help="also write the table as markdown here")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before the run is killed")
    parser.add_argument("--trace", action="store_true",
                        help="diagnostics builds (FLASHEP_ENABLE_DIAGNOSTICS=ON): also print the kernels' timeline")
    return parser.parse_args(argv)


def _kernel_times(torch, prof, name: str) -> List[float]:
    """Durations in us of the CUDA kernels whose name contains `name`, in launch order."""
    events = []
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA or name not in event.name:
            continue
        events.append((event.time_range.start, event.time_range.elapsed_us()))
    return [duration for _, duration in sorted(events)]


def _profile(torch, dist, calls, dev):
    """Runs calls() PROFILED_CALLS times under the profiler, each after a large GEMM and an
    all-reduce (DeepEP's method): the GEMM gives the host time to enqueue the calls before the GPU
    gets there, the all-reduce lines the GPUs up, so kernel times hold neither host time nor skew."""
    from torch.profiler import ProfilerActivity, profile

    a = torch.randn((8192, 8192), dtype=torch.bfloat16, device=dev)
    one = torch.ones((1,), device=dev)
    for _ in range(3):
        calls()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_CALLS):
            a @ a
            dist.all_reduce(one)
            calls()
        torch.cuda.synchronize()
    return prof


def _worker(rank: int, R: int, args: argparse.Namespace, port: int) -> None:
    import torch
    import torch.distributed as dist

    import flashep

    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=R, device_id=dev)
    H, K, E = args.hidden, args.topk, args.experts
    tokens = [int(t) for t in args.tokens.split(",") if t]
    paths = [p for p in args.paths.split(",") if p]
    if "nvshmem" in paths and not flashep._C.nvshmem_built():
        if rank == 0:
            print("flashep.bench_low_latency: this flashep has no NVSHMEM; the nvshmem path is skipped", flush=True)
        paths.remove("nvshmem")
    rows = []
    gemm_a = torch.randn((8192, 8192), dtype=torch.bfloat16, device=dev)
    for path in paths:
        size = max(flashep.Buffer.get_low_latency_rdma_size_hint(t, H, R, E) for t in tokens)
        buffer = flashep.Buffer(None, 0, size, low_latency_mode=True,
                                allow_nvlink_for_low_latency_mode=(path == "nvlink"), explicitly_destroy=True)
        for T in tokens:
            gen = torch.Generator(device=dev).manual_seed(20261130 + rank)
            x = torch.randn((T, H), generator=gen, device=dev).to(torch.bfloat16)
            idx = torch.rand((T, E), generator=gen, device=dev).topk(K, dim=1).indices.to(torch.int64).contiguous()
            w = torch.rand((T, K), generator=gen, device=dev)
            y = torch.randn((E // R, R * T, H), generator=gen, device=dev).to(torch.bfloat16)
            selections = int((idx >= 0).sum())

            def dispatch_combine():
                _, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, T, E)
                buffer.low_latency_combine(y, idx, w, handle)

            def hooked():
                # DeepEP's method: a large GEMM between the send and the hook, so the receive phase
                # finds the data there (its time is the receive work, not the transfer).
                _, _, handle, _, hook = buffer.low_latency_dispatch(x, idx, T, E, return_recv_hook=True)
                gemm_a @ gemm_a
                hook()
                _, _, hook = buffer.low_latency_combine(y, idx, w, handle, return_recv_hook=True)
                gemm_a @ gemm_a
                hook()

            prof = _profile(torch, dist, dispatch_combine, dev)
            t_dispatch = statistics.median(_kernel_times(torch, prof, "ll::dispatch"))
            t_combine = statistics.median(_kernel_times(torch, prof, "ll::combine"))
            prof = _profile(torch, dist, hooked, dev)
            d = _kernel_times(torch, prof, "ll::dispatch")
            c = _kernel_times(torch, prof, "ll::combine")
            t_loop, _ = _time_stream(torch, dist, dispatch_combine, 10, args.iters)
            # Host time of one dispatch + combine (Python included), GPU not waited for.
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(args.iters):
                dispatch_combine()
            t_host = (time.perf_counter() - started) / args.iters * 1e6
            torch.cuda.synchronize()
            # The same pair captured in a CUDA graph and replayed back to back (no host in the loop).
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                dispatch_combine()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                dispatch_combine()
            t_graph, _ = _time_stream(torch, dist, graph.replay, 10, args.iters)
            del graph
            fp8_bytes = selections * (H + H // 128 * 4 + 16)
            bf16_bytes = selections * 2 * H
            all_fp8 = [None] * R
            all_bf16 = [None] * R
            dist.all_gather_object(all_fp8, fp8_bytes)
            dist.all_gather_object(all_bf16, bf16_bytes)
            nccl_d = _nccl_baseline(torch, dist, [int(b) // R * R for b in all_fp8], rank, R, dev, 5, 30)["stream"][0]
            nccl_c = _nccl_baseline(torch, dist, [int(b) // R * R for b in all_bf16], rank, R, dev, 5, 30)["stream"][0]
            if args.trace:
                _print_trace(torch, dist, flashep, buffer, (x, idx, T, E, y, w), rank, f"{path} T={T}")
            rows.append(dict(path=path, T=T, dispatch=t_dispatch, combine=t_combine,
                             d_send=statistics.median(d[0::2]), d_recv=statistics.median(d[1::2]),
                             c_send=statistics.median(c[0::2]), c_recv=statistics.median(c[1::2]), loop=t_loop, host=t_host, graph=t_graph,
                             d_gbps=_gbps(fp8_bytes, t_dispatch), c_gbps=_gbps(bf16_bytes, t_combine),
                             nccl_d=nccl_d, nccl_c=nccl_c,
                             buffer_mb=flashep.Buffer.get_low_latency_rdma_size_hint(T, H, R, E) / 1e6))
            if rank == 0:
                r = rows[-1]
                print(f"[{path} T={T}] dispatch {r['dispatch']:.1f} us, combine {r['combine']:.1f} us, "
                      f"loop {r['loop']:.1f} us, graph {r['graph']:.1f} us, host {r['host']:.1f} us", flush=True)
        torch.cuda.synchronize()
        dist.barrier()
        buffer.destroy()
    if rank == 0:
        table = _table(rows, R, torch.cuda.get_device_name(dev), H, K, E)
        print(table, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(table + "\n")
    dist.barrier()
    dist.destroy_process_group()


def _print_trace(torch, dist, flashep, buffer, inputs, rank: int, label: str, repeats: int = 20) -> None:
    """Diagnostics builds: the median timeline of the kernels of one dispatch + combine, fused and
    with the hook (each hook after a GEMM, DeepEP's method, and again with nothing between the
    send and the hook), per kernel and point: us from the first block's start to the first and to
    the last block past the point."""
    take = flashep._C.debug_ll_trace
    if not take(False) and not take(True):
        if rank == 0:
            print("flashep.bench_low_latency --trace: this build has no diagnostics (FLASHEP_ENABLE_DIAGNOSTICS=ON)")
        return
    x, idx, T, E, y, w = inputs
    dev = torch.cuda.current_device()
    one = torch.ones((1,), device=dev)
    a = torch.randn((8192, 8192), dtype=torch.bfloat16, device=dev)
    # "no GEMM": the hook right after its send has finished, nothing in between: against the row
    # after the GEMM, what a cold L2 and instruction cache cost the receive.
    kernels = ("fused dispatch", "fused combine", "dispatch send", "dispatch hook", "combine send", "combine hook",
               "dispatch hook, no GEMM", "combine hook, no GEMM")
    samples = {k: [] for k in kernels}

    def lined_up():  # as in _profile: the call is queued before the GPUs get there, lined up by the all-reduce
        torch.cuda.synchronize()
        take(False)
        take(True)
        a @ a
        dist.all_reduce(one)

    def taken(name, combine):
        torch.cuda.synchronize()
        samples[name].append(take(combine))

    for _ in range(repeats):
        lined_up()
        _, _, handle, _, _ = buffer.low_latency_dispatch(x, idx, T, E)
        buffer.low_latency_combine(y, idx, w, handle)
        taken("fused dispatch", False)
        taken("fused combine", True)
        lined_up()
        _, _, handle, _, hook = buffer.low_latency_dispatch(x, idx, T, E, return_recv_hook=True)
        taken("dispatch send", False)
        a @ a
        hook()
        taken("dispatch hook", False)
        lined_up()
        _, _, hook = buffer.low_latency_combine(y, idx, w, handle, return_recv_hook=True)
        taken("combine send", True)
        a @ a
        hook()
        taken("combine hook", True)
        lined_up()
        _, _, handle, _, hook = buffer.low_latency_dispatch(x, idx, T, E, return_recv_hook=True)
        taken("dispatch send", False)
        dist.all_reduce(one)  # the peer's send has finished too
        torch.cuda.synchronize()
        take(False)
        hook()
        taken("dispatch hook, no GEMM", False)
        _, _, hook = buffer.low_latency_combine(y, idx, w, handle, return_recv_hook=True)
        taken("combine send", True)
        dist.all_reduce(one)
        torch.cuda.synchronize()
        take(True)
        hook()
        taken("combine hook, no GEMM", True)
    if rank != 0:
        return
    for kernel in kernels:
        combine = "combine" in kernel
        names = flashep._C.debug_ll_trace_points(combine)
        runs = samples[kernel]
        points = len(runs[0]) // 2
        print(f"[{label}] {kernel} timeline (us from the first block's start, median of {repeats}; first / last block):")
        for i, name in enumerate(names):
            first = [s[i] - s[0] for s in runs if s[points + i] != 0]
            last = [s[points + i] - s[0] for s in runs if s[points + i] != 0]
            if first:
                print(f"    {name:>18}: {statistics.median(first) / 1e3:7.2f} / {statistics.median(last) / 1e3:7.2f}")


def _table(rows, R: int, device_name: str, H: int, K: int, E: int) -> str:
    lines = [f"Low-latency mode, {R} x {device_name}, H {H}, top-{K} of {E} experts, FP8 dispatch, BF16 combine. "
             "Kernel times (us) from torch.profiler, median of 30 calls each after a GEMM and an all-reduce, rank 0; "
             "GB/s by DeepEP's definition ((token, expert) pairs x bytes); loop = dispatch + combine back to back, "
             "CUDA events; graph = the same pair captured in a CUDA graph, replays back to back; host = CPU time of "
             "one pair's Python calls; NCCL = all_to_all_single of the same bytes.",
             "",
             "| path | tokens | dispatch us | GB/s | combine us | GB/s | hook: dispatch send + recv | "
             "hook: combine send + recv | dispatch+combine us | graph us | host us | NCCL dispatch bytes us | "
             "NCCL combine bytes us | buffer MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['path']} | {r['T']} | {r['dispatch']:.1f} | {r['d_gbps']:.0f} | {r['combine']:.1f} | "
                     f"{r['c_gbps']:.0f} | {r['d_send']:.1f} + {r['d_recv']:.1f} | {r['c_send']:.1f} + "
                     f"{r['c_recv']:.1f} | {r['loop']:.1f} | {r['graph']:.1f} | {r['host']:.0f} | {r['nccl_d']:.1f} | {r['nccl_c']:.1f} | "
                     f"{r['buffer_mb']:.0f} |")
    if R == 2:
        ref = DEEPEP_REFERENCE_2GPU
        lines += ["", "DeepEP V1 on the same 2 x H200 at 128 tokens (issue 8): dispatch "
                      f"{ref['dispatch']} us, combine {ref['combine']} us, hook {ref['dispatch send']} + "
                      f"{ref['dispatch recv']} / {ref['combine send']} + {ref['combine recv']} us, dispatch+combine "
                      f"{ref['dispatch+combine']} us, buffer {ref['buffer MB']} MB."]
    return "\n".join(lines)


def _child(rank: int, R: int, args: argparse.Namespace, port: int) -> None:
    try:
        _worker(rank, R, args, port)
    except BaseException:
        sys.stderr.write(f"[rank {rank}] flashep.bench_low_latency failed:\n{traceback.format_exc()}")
        sys.stderr.flush()
        os._exit(1)


def main(argv: Optional[List[str]] = None) -> int:
    return launch("flashep.bench_low_latency", "flashep.bench_low_latency", _parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
