"""Host (CPU) time of the low-latency Python calls, by part, on one GPU (a world of one rank):
    python3 scripts/ll_host_overhead.py
Prints microseconds per call of: torch.empty, current_stream, the bare _C.ll_dispatch/_C.ll_combine
calls (C++ checks + launch), and the whole low_latency_dispatch/combine. Development aid."""
import os
import time

os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import flashep  # noqa: E402
from flashep import _C  # noqa: E402


def per_call(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = (time.perf_counter() - start) / n * 1e6
    torch.cuda.synchronize()
    return elapsed


def main():
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29513", rank=0, world_size=1)
    torch.cuda.set_device(0)
    T, H, E, K = 128, 7168, 288, 8
    buf = flashep.Buffer(None, 0, flashep.Buffer.get_low_latency_rdma_size_hint(T, H, 1, E), low_latency_mode=True)
    x = torch.randn((T, H), device="cuda").to(torch.bfloat16)
    idx = torch.rand((T, E), device="cuda").topk(K, dim=1).indices
    w = torch.rand((T, K), device="cuda")
    recv, count, handle, _, _ = buf.low_latency_dispatch(x, idx, T, E)
    y = torch.zeros((E, T, H), dtype=torch.bfloat16, device="cuda")
    rows = {
        "torch.empty": per_call(lambda: torch.empty((E, T, H), dtype=torch.float8_e4m3fn, device="cuda")),
        "current_stream": per_call(lambda: torch.cuda.current_stream()),
        "low_latency_dispatch": per_call(lambda: buf.low_latency_dispatch(x, idx, T, E)),
        "low_latency_combine": per_call(lambda: buf.low_latency_combine(y, idx, w, handle)),
    }
    stream = torch.cuda.current_stream().cuda_stream
    args = dict(x=x.data_ptr(), topk_idx=idx.data_ptr(), num_tokens=T, hidden=H, num_topk=K, max_tokens=T,
                num_experts=E, use_fp8=True, round_scale=False, use_ue8m0=False, recv_x=recv[0].data_ptr(),
                recv_scales=recv[1].data_ptr(), recv_count=count.data_ptr(), recv_stats=0, wait_stats=0,
                src_info=handle[0].data_ptr(), layout_range=handle[1].data_ptr(), plan=handle.plan.data_ptr())
    rows["_C.ll_dispatch (C++ + launch)"] = per_call(lambda: _C.ll_dispatch(buf.runtime, phases=3, call_slot=0, stream=stream, **args))
    for name, us in rows.items():
        print(f"{name:40s} {us:8.1f} us")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
