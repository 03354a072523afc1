"""Host time of the low-latency Python path on one GPU (world size 1): the pair, each call, the
Python before and inside the C++ call, and a cProfile. Run: python3 scripts/ll_host_profile.py (E=32
experts by default; E=... in the environment). Results: docs/performance.md, 2026-12-01."""
import cProfile, io, os, pstats, statistics, time
os.environ.setdefault("NVSHMEM_REMOTE_TRANSPORT", "none")
import torch, torch.distributed as dist
import flashep
import flashep.low_latency as ll_module
print("outputs made in C++ (flashep._torch_outputs):", getattr(ll_module, "OUTPUTS_IN_CPP", "n/a"), getattr(ll_module, "OUTPUTS_IMPORT_ERROR", None) or "")
dev = torch.device("cuda", 0); torch.cuda.set_device(0)
dist.init_process_group("nccl", init_method="tcp://127.0.0.1:29555", rank=0, world_size=1, device_id=dev)
T, H, E, K = 128, 7168, int(os.environ.get("E", "32")), 8
buf = flashep.Buffer(None, 0, flashep.Buffer.get_low_latency_rdma_size_hint(T, H, 1, E), low_latency_mode=True, explicitly_destroy=True)
x = torch.randn((T, H), device=dev).to(torch.bfloat16)
idx = torch.rand((T, E), device=dev).topk(K, dim=1).indices.to(torch.int64).contiguous()
w = torch.rand((T, K), device=dev)
y = torch.randn((E, T, H), device=dev).to(torch.bfloat16)
def pair():
    _, _, h, _, _ = buf.low_latency_dispatch(x, idx, T, E)
    buf.low_latency_combine(y, idx, w, h)
def d_only():
    return buf.low_latency_dispatch(x, idx, T, E)
for _ in range(50): pair()
torch.cuda.synchronize()
def host_us(fn, n=200, reps=7):
    out = []
    for _ in range(reps):
        torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(n): fn()
        out.append((time.perf_counter() - t) / n * 1e6)
    torch.cuda.synchronize()
    return statistics.median(out), min(out)
print("pair host us (median, min):", host_us(pair))
print("dispatch host us:", host_us(d_only))
_, _, h, _, _ = d_only(); torch.cuda.synchronize()
print("combine host us:", host_us(lambda: buf.low_latency_combine(y, idx, w, h)))
print("torch.empty x3 us:", host_us(lambda: (torch.empty((E, T, H), dtype=torch.float8_e4m3fn, device=dev), torch.empty((E, H // 128, T), dtype=torch.float32, device=dev).transpose(1, 2), torch.empty((1000,), dtype=torch.int64, device=dev))))
print("empty launch (torch add_) us:", host_us(lambda: w.add_(0)))
import flashep._C as C
for name, call in (("ll_dispatch", d_only), ("ll_combine", lambda: buf.low_latency_combine(y, idx, w, h))):
    orig = getattr(C, name); inside = []; before = []; t0 = [0]
    def timed(*a, orig=orig, inside=inside, before=before, t0=t0):
        t = time.perf_counter_ns(); before.append(t - t0[0]); r = orig(*a); inside.append(time.perf_counter_ns() - t); return r
    setattr(C, name, timed)
    for i in range(2000):
        t0[0] = time.perf_counter_ns(); call()
        if i % 100 == 0: torch.cuda.synchronize()
    setattr(C, name, orig); torch.cuda.synchronize()
    print(f"{name}: Python before the C++ call {statistics.median(before)/1000:.1f} us, the C++ call {statistics.median(inside)/1000:.1f} us")
pr = cProfile.Profile(); pr.enable()
for _ in range(2000): pair()
pr.disable(); torch.cuda.synchronize()
s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25); print(s.getvalue()[:6000])
buf.destroy(); dist.destroy_process_group()
