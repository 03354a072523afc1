"""flashep._torch_outputs (python/src/torch_outputs.cpp): the low-latency outputs made in C++ are the
tensors the Python fallback of low_latency.py makes (shapes, strides, dtypes, offsets, shared words),
on the CPU, so no GPU is needed; the GPU tests then run the C++ path end to end.

Skipped without torch (CI has none, so the module is not built there). In strict mode
(FLASHEP_TEST_EXPECT_GPUS set: the GPU machines, where flashep is built against their torch) the
module must import: a missing one would silently put the slower host path back.

    python3 -m pytest -v tests/python/test_torch_outputs.py
"""
from __future__ import annotations

import pytest

import dist_harness as dh

torch = pytest.importorskip("torch", reason="torch is not installed (CI): flashep._torch_outputs is not built")
low_latency = pytest.importorskip("flashep.low_latency")


def _module():
    if low_latency._outputs is None:
        why = f"flashep._torch_outputs does not import: {low_latency.OUTPUTS_IMPORT_ERROR}"
        if dh.expected_gpus() is not None:
            pytest.fail(f"strict mode (FLASHEP_TEST_EXPECT_GPUS): {why}")
        pytest.skip(why)
    return low_latency._outputs


class _Shape(low_latency._DispatchShape):
    """A _DispatchShape with its sizes set directly, on the CPU (device index -1)."""

    def __init__(self, L: int, R: int, T: int, H: int, use_fp8: bool, use_ue8m0: bool, plan_ints: int):
        self.num_local, self.num_ranks, self.max_tokens, self.hidden = L, R, T, H
        self.rows = R * T
        ints = L + L * self.rows + plan_ints
        self.ints, self.longs = ints + ints % 2, L * R
        self.use_fp8, self.use_ue8m0 = use_fp8, use_ue8m0
        self.x_dtype = torch.float8_e4m3fn if use_fp8 else torch.bfloat16
        self.device, self.device_index = torch.device("cpu"), -1
        self.scale_kind = 0 if not use_fp8 else (2 if use_ue8m0 else 1)
        self.scale_groups = 0 if not use_fp8 else H // (512 if use_ue8m0 else 128)


def _describe(t):
    if t is None or isinstance(t, int):
        return t if t is None else "address"
    return (tuple(t.shape), t.stride(), t.dtype, t.storage_offset(), t.untyped_storage().nbytes())


@pytest.mark.parametrize("use_fp8,use_ue8m0", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("L,R,T,H,plan_ints", [(144, 2, 128, 7168, 2 * 128 * 9 + 2), (1, 1, 1, 512, 11),
                                               (16, 8, 32, 2048, 8 * 32 * 9 + 8), (36, 8, 256, 4096, 0)])
def test_same_tensors_as_python(monkeypatch, L, R, T, H, plan_ints, use_fp8, use_ue8m0):
    module = _module()
    shape = _Shape(L, R, T, H, use_fp8, use_ue8m0, plan_ints)
    made_in_cpp = shape.allocate()
    monkeypatch.setattr(low_latency, "_outputs", None)
    made_in_python = shape.allocate()
    assert len(made_in_cpp) == len(made_in_python) == 9
    assert [_describe(t) for t in made_in_cpp] == [_describe(t) for t in made_in_python]
    recv_x, recv_scales, words, recv_count, src_info, layout_range, x_at, scales_at, words_at = made_in_cpp
    assert (x_at, scales_at, words_at) == (recv_x.data_ptr(), 0 if recv_scales is None else recv_scales.data_ptr(),
                                           words.data_ptr())
    # The three int views share the words' storage at the offsets the kernel writes.
    for view in (recv_count, src_info, layout_range):
        assert view.untyped_storage().data_ptr() == words.untyped_storage().data_ptr()
    words.zero_()
    src_info[L - 1, shape.rows - 1] = 7
    layout_range[L - 1, R - 1] = -3
    recv_count[0] = 5
    as_ints = words.view(torch.int32)
    assert as_ints[0].item() == 5 and as_ints[L + L * shape.rows - 1].item() == 7
    assert words[shape.ints // 2 + L * R - 1].item() == -3
    out, out_at = module.bf16_2d(-1, T, H)
    assert (tuple(out.shape), out.dtype, out.stride(), out_at) == ((T, H), torch.bfloat16, (H, 1), out.data_ptr())


def test_bad_arguments_raise():
    module = _module()
    with pytest.raises(TypeError, match="takes 10 ints"):
        module.dispatch_outputs(-1, 1, 2)
    with pytest.raises(TypeError):
        module.bf16_2d(-1, "a", 2)
    with pytest.raises(ValueError, match="inconsistent sizes"):
        module.dispatch_outputs(-1, 4, 8, 128, 1, 1, 1, 1, 40, 2)  # words too short for layout_range
    with pytest.raises(ValueError, match="negative size"):
        module.bf16_2d(-1, -1, 8)
    with pytest.raises(RuntimeError):  # torch's own error (overflow), as a Python exception
        module.bf16_2d(-1, 1 << 40, 1 << 30)


class _Subclass(torch.Tensor):
    pass


def _fast_cases(device):
    base = torch.zeros(4096, dtype=torch.bfloat16, device=device)
    x = torch.zeros((8, 256), dtype=torch.bfloat16, device=device)
    idx = torch.zeros((8, 4), dtype=torch.int64, device=device)
    w = torch.zeros((8, 4), dtype=torch.float32, device=device)
    y = torch.zeros((2, 16, 256), dtype=torch.bfloat16, device=device)
    ll = low_latency
    return [
        ("good", (x, ll._BF16_2D, idx, ll._INT64_2D), True),
        ("good, three", (y, ll._BF16_3D, idx, ll._INT64_2D, w, ll._FLOAT32_2D), True),
        ("dtype", (x.float(), ll._BF16_2D), False),
        ("rank", (y, ll._BF16_2D), False),
        ("not contiguous", (x[:, ::2], ll._BF16_2D), False),
        ("misaligned", (base[1:257].view(2, 128), ll._BF16_2D), False),
        ("a Parameter", (torch.nn.Parameter(x, requires_grad=False), ll._BF16_2D), True),
        ("a subclass", (x.as_subclass(_Subclass), ll._BF16_2D), False),
        ("not a tensor", ([1, 2], ll._BF16_2D), False),
        ("second bad", (x, ll._BF16_2D, idx.int(), ll._INT64_2D), False),
    ]


def test_check_tensors_is_the_python_check(monkeypatch):
    """check_tensors (C++) and the fallback of LowLatencyMixin._ll_fast give the same answers: on
    the CPU (always None: not CUDA) and, where there is a GPU, on CUDA tensors."""
    import types

    module = _module()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        index = 0 if device == "cuda" else -1
        owner = types.SimpleNamespace(_device_index=index)
        for name, args, good in _fast_cases(device):
            in_cpp = module.check_tensors(index, *args)
            with monkeypatch.context() as m:
                m.setattr(low_latency, "_outputs", None)
                in_python = low_latency.LowLatencyMixin._ll_fast(owner, *args)
            assert in_cpp == in_python, (device, name)
            assert (in_cpp is not None) == (good and device == "cuda"), (device, name, in_cpp)
            if in_cpp is not None:
                tensors = args[0::2]
                expected = []
                for t in tensors:
                    expected += [t.data_ptr(), *t.shape]
                assert in_cpp == tuple(expected)
        if device == "cuda":  # another device index than the tensors'
            assert module.check_tensors(1, *_fast_cases(device)[0][1]) is None
    with pytest.raises(TypeError):
        module.check_tensors(-1, torch.zeros(1))


def test_refuses_another_torch():
    """Built against one torch, imported with another (here: torch.__version__ changed before the
    import), the module raises ImportError instead of reading tensors laid out differently."""
    import subprocess
    import sys

    module = _module()
    code = ("import importlib.util, sys, torch\n"
            "torch.__version__ = '0.0.0+other'\n"
            f"spec = importlib.util.spec_from_file_location('flashep._torch_outputs', {module.__file__!r})\n"
            "try:\n"
            "    importlib.util.module_from_spec(spec)\n"
            "except ImportError as error:\n"
            "    print('refused:', error)\n"
            "    sys.exit(0)\n"
            "sys.exit('imported with another torch')\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "rebuild flashep" in run.stdout
