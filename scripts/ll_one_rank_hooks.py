"""Hooked low-latency dispatches at world size 1, each hook after a large GEMM (DeepEP's method): the
workload scripts/ll_ncu.sh profiles. T = 128, H = 7168, top-8 of 288 experts, FP8 (T=..., E=... in
the environment change them). Run alone it just runs (20 calls)."""
import os

os.environ.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import flashep  # noqa: E402
from flashep.utils import free_tcp_port  # noqa: E402

dev = torch.device("cuda", 0)
torch.cuda.set_device(0)
dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_tcp_port()}", rank=0, world_size=1, device_id=dev)
T, H, E, K = int(os.environ.get("T", "128")), 7168, int(os.environ.get("E", "288")), 8
buffer = flashep.Buffer(None, 0, flashep.Buffer.get_low_latency_rdma_size_hint(T, H, 1, E), low_latency_mode=True,
                        explicitly_destroy=True)
x = torch.randn((T, H), device=dev).to(torch.bfloat16)
idx = torch.rand((T, E), device=dev).topk(K, dim=1).indices.to(torch.int64).contiguous()
w = torch.rand((T, K), device=dev)
a = torch.randn((8192, 8192), dtype=torch.bfloat16, device=dev)
y = torch.randn((E, T, H), device=dev).to(torch.bfloat16)  # the experts' outputs: [L, R*T, H] at R = 1
for _ in range(20):
    _, _, handle, _, hook = buffer.low_latency_dispatch(x, idx, T, E, return_recv_hook=True)
    a @ a
    hook()
    buffer.low_latency_combine(y, idx, w, handle)
torch.cuda.synchronize()
buffer.destroy()
dist.destroy_process_group()
print("ll_one_rank_hooks: 20 hooked dispatches done")
