"""Runs a test function on R GPU processes (one per GPU) and turns every way that can go wrong into a
clear pytest failure.

    import dist_harness as dh

    def _worker(rank, world_size, arg):      # module-level, so that 'spawn' can pickle it
        ...                                   # torch.distributed is initialised (NCCL, device_id set)
        return some_picklable_result

    @pytest.mark.parametrize("world_size", dh.WORLD_SIZES, ids=dh.world_ids())
    def test_x(world_size):
        results = dh.run_world(_worker, world_size, args=(arg,))

What run_world() does:
  * skips (pytest.skip, with the reason) when torch is not importable or there are fewer than R GPUs,
    unless FLASHEP_TEST_EXPECT_GPUS says this machine must run it (then it fails; see below);
  * starts R 'spawn' processes; each sets NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
    NVSHMEM_DISABLE_NVLS=1 (and `env`) before anything touches CUDA, calls torch.cuda.set_device(rank),
    dist.init_process_group('nccl', tcp://127.0.0.1:<free port>, device_id=cuda:rank), runs
    fn(rank, world_size, *args), and reports the result or its traceback through a Queue;
  * bounds the whole run by `timeout_s`: ranks still running then are asked for their Python stacks
    (SIGUSR1 -> faulthandler, printed on their stderr), killed, and named in the failure;
  * once one rank failed, the others get `grace_s` to finish before they are killed (they are usually
    blocked waiting for the failed one);
  * a rank that reported success but does not exit within `exit_grace_s` (hang in teardown), exits
    with a non-zero code, or dies without reporting (segfault, OOM kill) is a failure too.

This module imports neither torch nor pytest at import time: test files that use it can be collected
on a machine without either.

Environment knobs (read by the tests through the helpers below):
  FLASHEP_TEST_QUICK=1       smaller case grids (quick_mode())
  FLASHEP_TEST_TIMEOUT_S=N   overrides every run_world timeout (e.g. under compute-sanitizer)
  FLASHEP_TEST_EXPECT_GPUS=N strict mode, for GPU machines (scripts/gpu_check.sh sets it): this machine
                             has N GPUs, so a test needing <= N GPUs that would skip because torch
                             does not import, CUDA is unusable or fewer GPUs are visible FAILS instead
                             (pytest.fail, naming what is missing); tests needing more than N GPUs
                             still skip. Unset or empty: skip as usual (CPU machines, CI).
  FLASHEP_TEST_SHARE_GPUS=N  up to N ranks per GPU (default 1): a world of R ranks runs on
                             ceil(R / N) GPUs, rank r on GPU r % count, and torch.distributed uses gloo
                             (NCCL refuses two ranks on one GPU). Correctness only: the ranks' contexts
                             time-slice the GPU, so timings mean nothing. Peers on one GPU still map each
                             other's buffers through CUDA IPC and run every multi-rank code path; what
                             they cannot test is the ordering of stores crossing NVLink, nor (without
                             MPS) races at microsecond scale: time-sliced, two ranks' kernels never run
                             at the same time (the cross-rank waits are exercised, their races are not).
"""
from __future__ import annotations

import faulthandler
import os
import queue as queue_module
import signal
import sys
import time
import traceback
from typing import Any, Callable, Dict, List, NoReturn, Optional, Sequence

#: NVLink multicast must stay off on the GPU machines (see docs/gpu-machine.md).
NVLS_ENV: Dict[str, str] = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
# The parent process too (pytest itself never creates a CUDA context, but be safe).
os.environ.update(NVLS_ENV)

#: World sizes the GPU tests are parametrized over.
WORLD_SIZES = (2, 4, 8)


def world_ids(sizes: Sequence[int] = WORLD_SIZES) -> List[str]:
    """pytest ids 'R2', 'R4', 'R8' (select one with -k R2)."""
    return [f"R{r}" for r in sizes]


def quick_mode() -> bool:
    """True when FLASHEP_TEST_QUICK is set to something other than '' or '0'."""
    return os.environ.get("FLASHEP_TEST_QUICK", "").strip() not in ("", "0")


def env_int(name: str, default: int) -> int:
    text = os.environ.get(name, "").strip()
    return int(text) if text else default


def _timeout(default: float) -> float:
    text = os.environ.get("FLASHEP_TEST_TIMEOUT_S", "").strip()
    return float(text) if text else float(default)


# ---- skipping ------------------------------------------------------------------------------------


def expected_gpus() -> Optional[int]:
    """N of FLASHEP_TEST_EXPECT_GPUS=N (strict mode), or None when unset/empty.

    A value that is not an integer >= 0 raises ValueError: a typo must not silently turn strict mode
    off."""
    text = os.environ.get("FLASHEP_TEST_EXPECT_GPUS", "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"FLASHEP_TEST_EXPECT_GPUS={text!r}: expected a GPU count (an integer >= 0)")
    return value


def ranks_per_gpu() -> int:
    """N of FLASHEP_TEST_SHARE_GPUS=N (default 1: one rank per GPU). Not an integer >= 1: ValueError."""
    text = os.environ.get("FLASHEP_TEST_SHARE_GPUS", "").strip()
    if not text:
        return 1
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"FLASHEP_TEST_SHARE_GPUS={text!r}: expected ranks per GPU (an integer >= 1)")
    return value


def gpus_needed(world_size: int) -> int:
    """GPUs a world of `world_size` ranks runs on: ceil(world_size / ranks_per_gpu())."""
    return -(-world_size // ranks_per_gpu())


def gpu_count_or_skip(world_size: int) -> int:
    """Skips the calling test (with the reason) unless torch imports and >= world_size GPUs exist.

    In strict mode (FLASHEP_TEST_EXPECT_GPUS=N with world_size <= N) it fails instead: on a machine
    that should have N GPUs, a missing torch or GPU is a broken machine, not a reason to skip."""
    import pytest

    expect = expected_gpus()
    needed = gpus_needed(world_size)
    strict = expect is not None and needed <= expect

    def not_here(reason: str) -> NoReturn:
        if strict:
            pytest.fail(f"FLASHEP_TEST_EXPECT_GPUS={expect} but {reason}; this test needs {needed} GPUs "
                        f"and must run on this machine", pytrace=False)
        pytest.skip(reason)

    try:
        import torch
    except Exception as error:  # ImportError, or a broken install
        not_here(f"torch is not importable ({type(error).__name__}: {error}); "
                 f"this test needs torch and {needed} GPUs")
    try:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception as error:
        not_here(f"torch.cuda is not usable ({type(error).__name__}: {error}); needs {needed} GPUs")
    if count < needed:
        not_here(f"needs {needed} GPUs, torch.cuda.device_count() = {count}"
                 + ("" if torch.version.cuda else f" (torch {torch.__version__} is built without CUDA)"))
    return count


# ---- helpers for the workers ---------------------------------------------------------------------


def log0(rank: int, message: str) -> None:
    """Progress line, printed by rank 0 only (stdout, flushed)."""
    if rank == 0:
        print(message, flush=True)


def log_all(rank: int, message: str) -> None:
    """Line printed by every rank on stderr, prefixed with the rank (flushed)."""
    sys.stderr.write(f"[rank {rank}] {message}\n")
    sys.stderr.flush()


def virtual_nodes_env(domain_size: int = 1, **env: str) -> dict:
    """`env` plus what runs this host's GPUs as NVLink domains ("nodes") of `domain_size`, with
    NVSHMEM between them over NVLink P2P (no NIC transport)."""
    return {**env, "FLASHEP_NVL_DOMAIN_SIZE": str(domain_size), "NVSHMEM_REMOTE_TRANSPORT": "none"}


def require_nvshmem(what: str) -> None:
    """Skips the calling test when flashep was built without NVSHMEM (`what` says which path needs
    it); in strict GPU runs (FLASHEP_TEST_EXPECT_NVSHMEM=1) that is a failure instead. A flashep that
    does not import fails the test."""
    import pytest

    try:
        from flashep import _C
        built = _C.nvshmem_built()
    except Exception as error:  # an import failure is the GPU test's failure
        pytest.fail(f"flashep does not import: {error}")
    if not built:
        if os.environ.get("FLASHEP_TEST_EXPECT_NVSHMEM", "") not in ("", "0"):
            pytest.fail("FLASHEP_TEST_EXPECT_NVSHMEM is set but this flashep has no NVSHMEM")
        pytest.skip(f"flashep built without NVSHMEM: {what}")


# ---- the child process ---------------------------------------------------------------------------


def _child_main(fn: Callable, rank: int, world_size: int, port: int, result_queue, args: tuple,
                extra_env: Dict[str, str]) -> None:
    os.environ.update(NVLS_ENV)
    # Without these, the survivors of a failed rank (rank 0 hosts the TCPStore) flood stderr with
    # "Failed to check the 'should dump' flag on TCPStore" warnings while the harness waits for them.
    os.environ.setdefault("TORCH_NCCL_DUMP_ON_TIMEOUT", "0")
    os.environ.setdefault("TORCH_NCCL_ENABLE_MONITORING", "0")
    os.environ.update(extra_env)
    os.environ.update({
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    })
    # The parent sends SIGUSR1 to a hung rank before killing it: print every thread's Python stack.
    try:
        faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True)
    except Exception:
        pass
    try:
        import torch
        import torch.distributed as dist

        # Oversubscription: R processes share the host's cores (input generation, CPU oracle).
        torch.set_num_threads(max(1, min(16, (os.cpu_count() or 8) // world_size)))
        torch.cuda.set_device(rank % torch.cuda.device_count())  # rank itself unless GPUs are shared
        if ranks_per_gpu() == 1:
            dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world_size, device_id=torch.device("cuda", rank))
        else:  # shared GPUs (FLASHEP_TEST_SHARE_GPUS): NCCL refuses two ranks on one GPU
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world_size)
        result = fn(rank, world_size, *args)
    except BaseException:
        text = traceback.format_exc()
        try:
            sys.stderr.write(f"[rank {rank}] FAILED:\n{text}")
            sys.stderr.flush()
            result_queue.put(("error", rank, text))
            result_queue.close()
            result_queue.join_thread()
        finally:
            # No teardown: peers may be gone or blocked, and NCCL/flashep teardown could hang.
            os._exit(1)
    try:
        result_queue.put(("ok", rank, result))
    except Exception:  # an unpicklable result must not hide a passing run
        result_queue.put(("ok", rank, repr(result)))
    result_queue.close()
    result_queue.join_thread()
    sys.stdout.flush()
    try:
        dist.destroy_process_group()
    except Exception as error:
        log_all(rank, f"warning: destroy_process_group raised {error!r}")


# ---- the parent ----------------------------------------------------------------------------------


def run_world(fn: Callable, world_size: int, args: Sequence[Any] = (), env: Optional[Dict[str, str]] = None,
              timeout_s: float = 600.0, grace_s: float = 20.0, exit_grace_s: float = 60.0) -> List[Any]:
    """Runs fn(rank, world_size, *args) on `world_size` GPU processes; returns the results by rank.

    Fails the calling pytest test (pytest.fail, with every rank's traceback or state) on any error,
    hang or abnormal exit; skips it when torch or enough GPUs are missing (fails it instead in strict
    mode: FLASHEP_TEST_EXPECT_GPUS, see gpu_count_or_skip). `fn` must be a
    module-level function (pickled by reference for the 'spawn' start method)."""
    import multiprocessing
    import pytest

    gpu_count_or_skip(world_size)
    timeout_s = _timeout(timeout_s)
    extra_env = {str(k): str(v) for k, v in (env or {}).items()}
    ctx = multiprocessing.get_context("spawn")
    result_queue = ctx.Queue()
    from flashep.utils import free_tcp_port  # here: a test whose subject fails to import fails

    port = free_tcp_port()

    # The children inherit os.environ at start: set NVLS + extra env before spawning (the children
    # import the test module, and with it flashep, before _child_main runs).
    saved = {k: os.environ.get(k) for k in list(NVLS_ENV) + list(extra_env)}
    os.environ.update(NVLS_ENV)
    os.environ.update(extra_env)
    processes = []
    try:
        for rank in range(world_size):
            p = ctx.Process(target=_child_main, name=f"flashep-test-rank{rank}",
                            args=(fn, rank, world_size, port, result_queue, tuple(args), extra_env),
                            daemon=True)
            p.start()
            processes.append(p)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    start = time.monotonic()
    deadline = start + timeout_s
    results: Dict[int, Any] = {}
    errors: Dict[int, str] = {}
    first_error_at: Optional[float] = None
    all_ok_at: Optional[float] = None
    verdict = ""  # why the loop stopped early

    def drain(block_s: float) -> None:
        nonlocal first_error_at
        try:
            kind, rank, payload = result_queue.get(timeout=block_s)
        except queue_module.Empty:
            return
        while True:
            if kind == "ok":
                results[rank] = payload
            else:
                errors[rank] = payload
                if first_error_at is None:
                    first_error_at = time.monotonic()
            try:
                kind, rank, payload = result_queue.get_nowait()
            except queue_module.Empty:
                return

    while True:
        exited = {r for r, p in enumerate(processes) if not p.is_alive()}
        drain(0.2)
        now = time.monotonic()
        # A process that exited has flushed its messages: if none came, it died without reporting.
        for r in exited:
            if r not in results and r not in errors:
                drain(0.5)
                if r not in results and r not in errors:
                    code = processes[r].exitcode
                    errors[r] = (f"process exited with code {code} without reporting a result"
                                 + (f" (killed by signal {-code})" if code is not None and code < 0 else ""))
                    if first_error_at is None:
                        first_error_at = now
        if len(exited) == world_size and len(results) + len(errors) == world_size:
            break
        if len(results) == world_size and all_ok_at is None:
            all_ok_at = now
        if all_ok_at is not None and now > all_ok_at + exit_grace_s:
            verdict = f"every rank reported success but some did not exit within {exit_grace_s:.0f} s"
            break
        if first_error_at is not None and now > first_error_at + grace_s:
            verdict = f"a rank failed; the others were given {grace_s:.0f} s to finish"
            break
        if now > deadline:
            verdict = f"the run exceeded its time limit of {timeout_s:.0f} s"
            break

    # Stragglers: ask for their Python stacks, then kill them.
    alive = [r for r, p in enumerate(processes) if p.is_alive()]
    if alive:
        for r in alive:
            try:
                os.kill(processes[r].pid, signal.SIGUSR1)
            except Exception:
                pass
        time.sleep(3.0)
        for r in alive:
            if processes[r].is_alive():
                processes[r].kill()
        for r in alive:
            processes[r].join(10.0)
        drain(0.5)
    for p in processes:
        p.join(1.0)
    elapsed = time.monotonic() - start

    problems = []
    for r in range(world_size):
        code = processes[r].exitcode
        if r in errors:
            problems.append(f"--- rank {r}: FAILED ---\n{errors[r].rstrip()}")
        elif r in alive and r not in results:
            problems.append(f"--- rank {r}: HUNG (no result; killed; Python stack on its stderr above) ---")
        elif r in alive:
            problems.append(f"--- rank {r}: reported success but HUNG at exit (killed; stack on its stderr) ---")
        elif r in results and code not in (0, None):
            problems.append(f"--- rank {r}: reported success but exited with code {code} ---")
    if problems:
        hung = [r for r in alive if r not in errors]
        head = (f"{getattr(fn, '__name__', fn)} on {world_size} ranks failed after {elapsed:.1f} s"
                + (f": {verdict}" if verdict else "")
                + (f"; hung/killed ranks: {hung}" if hung else "")
                + f"; failed ranks: {sorted(errors)}")
        pytest.fail(head + "\n" + "\n".join(problems), pytrace=False)
    return [results[r] for r in range(world_size)]
