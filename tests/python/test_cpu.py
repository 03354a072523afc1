"""CPU-only tests of flashep._C: Config, buffer-size hints, channels and the CPU oracle.

They need neither a GPU nor torch (CI): the extension is imported as `flashep._C`, or, when the
package's __init__ cannot be imported, loaded straight from its file (FLASHEP_EXT_DIR, else the
`flashep` package found on sys.path). A missing or broken extension FAILS every test, with the
import errors; it never skips: a skip let CI pass on a garbage _C.so ("36 skipped", exit 0; issue 7).
There is deliberately no switch to turn that failure back into a skip; to run only the GPU tests,
name their files. The oracle is also checked against a small, independent numpy re-implementation
of interface.md, since every GPU test trusts it.

    python3 -m pytest -v tests/python/test_cpu.py
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
from types import ModuleType
from typing import List

import pytest

# numpy is a hard requirement (scripts/test.sh installs it): an importorskip here would skip every
# test below and let CI pass without testing anything.
try:
    import numpy as np
except ImportError as _numpy_error:
    pytest.fail(f"numpy is needed by the CPU tests and does not import: {_numpy_error}", pytrace=False)


# ---- loading the extension -----------------------------------------------------------------------


def _load_extension() -> ModuleType:
    """flashep._C, or pytest.fail naming every place tried and why it did not import."""
    errors: List[str] = []
    try:
        return importlib.import_module("flashep._C")
    except Exception as error:  # a broken/missing _C*.so, or another import error in flashep/__init__.py
        errors.append(f"import flashep._C: {type(error).__name__}: {error}")
    directories: List[str] = []
    if os.environ.get("FLASHEP_EXT_DIR"):
        directories.append(os.environ["FLASHEP_EXT_DIR"])
    try:
        spec = importlib.util.find_spec("flashep")
        if spec is not None and spec.submodule_search_locations:
            directories.extend(spec.submodule_search_locations)
    except Exception as error:
        errors.append(f"find_spec('flashep'): {type(error).__name__}: {error}")
    candidates = 0
    for directory in directories:
        for path in sorted(glob.glob(os.path.join(directory, "_C*.so")) + glob.glob(os.path.join(directory, "_C*.pyd"))):
            candidates += 1
            try:
                spec = importlib.util.spec_from_file_location("flashep._C", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
                return module
            except Exception as error:
                errors.append(f"{path}: {type(error).__name__}: {error}")
    if not directories:
        errors.append("no 'flashep' package on sys.path and FLASHEP_EXT_DIR is not set")
    elif not candidates:
        errors.append(f"no _C*.so in {directories}")
    # A failure, not a skip (issue 7): these tests are the CI's only check of the extension.
    pytest.fail("flashep._C extension is not importable (build it: bash scripts/test.sh, which stages "
                "build/pkg for PYTHONPATH):\n  " + "\n  ".join(errors), pytrace=False)


@pytest.fixture(scope="module")
def C() -> ModuleType:
    return _load_extension()


# ---- bf16 helpers (numpy) ------------------------------------------------------------------------


def f32_to_bf16_bits(values):
    """bf16 bits (uint16) of float32 values that bf16 represents exactly (small integers, 2^-k)."""
    values = np.asarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    assert np.all((bits & 0xFFFF) == 0), "value not exactly representable in bf16"
    return (bits >> 16).astype(np.uint16)


def bf16_bits_to_f32(bits):
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def random_topk(rng, n, k, e, mask_frac=0.0):
    """Each token picks k distinct experts of e uniformly; a fraction of slots becomes -1."""
    idx = np.argsort(rng.random((n, e)), axis=1)[:, :k].astype(np.int64) if n else np.zeros((0, k), np.int64)
    if mask_frac:
        idx[rng.random((n, k)) < mask_frac] = -1
    return np.ascontiguousarray(idx)


# ---- independent numpy reference of interface.md -------------------------------------------------


def ref_layout(topk, num_experts, num_ranks, nvl_domain):
    n = topk.shape[0]
    local = num_experts // num_ranks
    valid = topk >= 0
    dest = np.where(valid, topk // local, -1)
    in_rank = np.zeros((n, num_ranks), dtype=bool)
    for r in range(num_ranks):
        in_rank[:, r] = (dest == r).any(axis=1)
    per_rank = in_rank.sum(axis=0).astype(np.int32)
    nodes = num_ranks // nvl_domain
    per_node = np.array([in_rank[:, i * nvl_domain:(i + 1) * nvl_domain].any(axis=1).sum() for i in range(nodes)],
                        dtype=np.int32)
    per_expert = np.array([(topk == e).sum() for e in range(num_experts)], dtype=np.int32)
    return per_rank, per_node, per_expert, in_rank


def ref_dispatch(num_ranks, num_experts, align, inputs):
    """inputs[r]: dict x (uint8 [n, row]), x_scales or None, topk_idx, topk_weights or None."""
    local = num_experts // num_ranks
    layouts = [ref_layout(inp["topk_idx"], num_experts, num_ranks, num_ranks)[3] for inp in inputs]
    counts = np.array([[layouts[s][:, d].sum() for d in range(num_ranks)] for s in range(num_ranks)])
    prefix = np.cumsum(counts, axis=0).astype(np.int32)
    outputs = []
    for d in range(num_ranks):
        xs, scales, idxs, weights, srcs = [], [], [], [], []
        per_expert = np.zeros(local, dtype=np.int64)
        for s, inp in enumerate(inputs):
            tokens = np.nonzero(layouts[s][:, d])[0]
            topk = inp["topk_idx"][tokens]
            xs.append(inp["x"][tokens])
            if inp.get("x_scales") is not None:
                scales.append(inp["x_scales"][tokens])
            mine = (topk >= d * local) & (topk < (d + 1) * local)
            idxs.append(np.where(mine, topk - d * local, -1))
            if inp.get("topk_weights") is not None:
                weights.append(np.where(mine, inp["topk_weights"][tokens], np.float32(0)).astype(np.float32))
            srcs.append(tokens.astype(np.int32))
            for l in range(local):
                per_expert[l] += (topk == d * local + l).sum()
        aligned = [int((c + align - 1) // align * align) for c in per_expert]
        outputs.append({
            "recv_x": np.concatenate(xs),
            "recv_x_scales": np.concatenate(scales) if scales else None,
            "recv_topk_idx": np.concatenate(idxs),
            "recv_topk_weights": np.concatenate(weights) if weights else None,
            "recv_src_idx": np.concatenate(srcs),
            "num_recv_tokens_per_expert": aligned,
            "rank_prefix_matrix": prefix,
        })
    return outputs


# ---- Config, hints, channels ---------------------------------------------------------------------

CONFIG_ARGS = [(20, 6, 256, 6, 256), (24, 6, 256, 6, 256), (8, 4, 32, 6, 256), (2, 1, 8, 6, 256),
               (32, 8, 128, 6, 256), (16, 8, 64, 6, 256)]


def test_config_defaults(C):
    assert hasattr(C, "Config"), "flashep._C has no Config"
    cfg = C.Config()
    got = (cfg.num_sms, cfg.num_max_nvl_chunked_send_tokens, cfg.num_max_nvl_chunked_recv_tokens,
           cfg.num_max_rdma_chunked_send_tokens, cfg.num_max_rdma_chunked_recv_tokens)
    assert got == (20, 6, 256, 6, 256), f"Config() defaults are {got}, DeepEP's are (20, 6, 256, 6, 256)"
    positional = C.Config(24, 8, 128, 4, 64)
    keyword = C.Config(num_sms=24, num_max_nvl_chunked_send_tokens=8, num_max_nvl_chunked_recv_tokens=128,
                       num_max_rdma_chunked_send_tokens=4, num_max_rdma_chunked_recv_tokens=64)
    for c in (positional, keyword):
        got = (c.num_sms, c.num_max_nvl_chunked_send_tokens, c.num_max_nvl_chunked_recv_tokens,
               c.num_max_rdma_chunked_send_tokens, c.num_max_rdma_chunked_recv_tokens)
        assert got == (24, 8, 128, 4, 64), f"Config(24, 8, 128, 4, 64) reads back as {got}"


@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8])
def test_nvl_hint_multiple_of_128_and_monotonic(C, num_ranks):
    for args in CONFIG_ARGS:
        cfg = C.Config(*args)
        previous = 0
        for hidden in (2048, 2560, 4096, 5120, 6144, 7168, 8192):
            hint = cfg.get_nvl_buffer_size_hint(hidden * 2, num_ranks)
            assert isinstance(hint, int), f"hint is {type(hint).__name__}"
            assert hint > 0 or num_ranks == 1, f"Config{args}: nvl hint {hint} for H={hidden}, R={num_ranks}"
            assert hint % 128 == 0, f"Config{args}: nvl hint {hint} (H={hidden}, R={num_ranks}) not a multiple of 128"
            assert hint >= previous, (f"Config{args}: nvl hint decreases with hidden ({previous} -> {hint} at "
                                      f"H={hidden}, R={num_ranks})")
            previous = hint


def test_nvl_hint_grows_with_ring_depth(C):
    for num_ranks in (2, 8):
        small = C.Config(24, 4, 32, 6, 256).get_nvl_buffer_size_hint(7168 * 2, num_ranks)
        large = C.Config(24, 4, 256, 6, 256).get_nvl_buffer_size_hint(7168 * 2, num_ranks)
        assert large > small, f"R={num_ranks}: recv ring of 256 slots needs {large} B, of 32 slots {small} B"


@pytest.mark.parametrize("num_ranks", [2, 4, 8])
def test_rdma_hint_zero_on_one_node(C, num_ranks):
    for args in CONFIG_ARGS:
        cfg = C.Config(*args)
        for hidden in (2048, 7168):
            hint = cfg.get_rdma_buffer_size_hint(hidden * 2, num_ranks)
            assert hint == 0, f"Config{args}: rdma hint {hint} for {num_ranks} ranks on one node (expected 0)"


def test_rdma_hint_multi_node(C):
    cfg = C.Config()
    hint = cfg.get_rdma_buffer_size_hint(7168 * 2, 16)
    assert hint > 0 and hint % 128 == 0, f"rdma hint for 16 ranks (2 nodes of 8) is {hint}"
    hint4 = cfg.get_rdma_buffer_size_hint(7168 * 2, 8, 4)
    assert hint4 > 0 and hint4 % 128 == 0, f"rdma hint for 8 ranks in NVLink domains of 4 is {hint4}"
    # The multi-node path's rail stage fits 4096 tokens per rank (FLASHEP_INTERNODE_MAX_TOKENS' default)
    # of BF16 rows with any top-k, FP8 too.
    for fp8 in (False, True):
        for topk in (1, 8, C.kMaxTopk):
            assert hint >= C.internode_rail_bytes(16, 8, 4096, 7168, fp8, topk)
            assert hint4 >= C.internode_rail_bytes(8, 4, 4096, 7168, fp8, topk)


def test_config_validation(C):
    with pytest.raises((ValueError, RuntimeError)):
        C.Config(24, 8, 4, 6, 256).get_nvl_buffer_size_hint(4096, 8)  # recv ring smaller than a send chunk
    with pytest.raises((ValueError, RuntimeError)):
        C.Config(0, 6, 256, 6, 256).get_nvl_buffer_size_hint(4096, 8)


def test_num_channels(C):
    assert hasattr(C, "num_channels"), "flashep._C has no num_channels"
    per_block = {}
    for num_ranks in (2, 4, 8):
        for sms in (2, 8, 12, 20, 24, 32):
            channels = C.num_channels(sms, num_ranks)
            assert channels >= sms and channels % sms == 0, f"num_channels({sms}, {num_ranks}) = {channels}"
            assert channels <= C.kMaxChannels, f"num_channels({sms}, {num_ranks}) = {channels} > kMaxChannels"
            per_block.setdefault(num_ranks, set()).add(channels // sms)
    for num_ranks, values in per_block.items():
        assert len(values) == 1, f"channels per SM for R={num_ranks} depend on the SM count: {values}"
    per_sm = {r: next(iter(v)) for r, v in per_block.items()}
    assert per_sm[2] >= per_sm[4] >= per_sm[8] >= 1, f"channels per SM should not grow with R: {per_sm}"


def test_default_configs(C):
    for name in ("default_dispatch_config", "default_combine_config"):
        if not hasattr(C, name):
            pytest.skip(f"flashep._C has no {name}")
        for num_ranks in (2, 4, 8):
            cfg = getattr(C, name)(num_ranks, 24)
            assert cfg.num_sms == 24, f"{name}({num_ranks}, 24).num_sms = {cfg.num_sms}"
            assert cfg.num_max_nvl_chunked_recv_tokens >= cfg.num_max_nvl_chunked_send_tokens >= 1
            hint = cfg.get_nvl_buffer_size_hint(7168 * 2, num_ranks)
            assert hint > 0 and hint % 128 == 0


# ---- oracle: bf16 conversion ---------------------------------------------------------------------


def test_oracle_bf16_conversion(C):
    if not hasattr(C, "oracle_float_to_bf16"):
        pytest.skip("flashep._C has no oracle_float_to_bf16")
    assert C.oracle_float_to_bf16(1.0) == 0x3F80
    assert C.oracle_float_to_bf16(-2.0) == 0xC000
    assert C.oracle_bf16_to_float(0x3F80) == 1.0
    # round to nearest even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> 1 (even mantissa)
    assert C.oracle_float_to_bf16(1.0 + 2.0 ** -8) == 0x3F80
    assert C.oracle_float_to_bf16(1.0 + 3 * 2.0 ** -8) == 0x3F82  # halfway 0x3F81/0x3F82 -> even 0x3F82


# ---- oracle: layout ------------------------------------------------------------------------------


def test_oracle_layout_by_hand(C):
    # R = 2, E = 4 (experts 0,1 on rank 0; 2,3 on rank 1)
    topk = np.array([[0, 3], [1, -1], [-1, -1], [3, 2]], dtype=np.int64)
    per_rank, per_node, per_expert, in_rank = C.oracle_get_dispatch_layout(topk, 4, 2, 2)
    assert per_rank.dtype == np.int32 and per_expert.dtype == np.int32 and in_rank.dtype == np.bool_
    assert per_rank.tolist() == [2, 2]
    assert per_node.tolist() == [3]
    assert per_expert.tolist() == [1, 1, 1, 2]
    assert in_rank.tolist() == [[True, True], [True, False], [False, False], [False, True]]
    # two "nodes" of one rank each
    _, per_node, _, _ = C.oracle_get_dispatch_layout(topk, 4, 2, 1)
    assert per_node.tolist() == [2, 2]


@pytest.mark.parametrize("num_ranks,num_experts,num_topk,n", [(2, 2, 1, 17), (4, 64, 6, 300), (8, 256, 8, 129),
                                                              (8, 64, 8, 0)])
def test_oracle_layout_random(C, num_ranks, num_experts, num_topk, n):
    rng = np.random.default_rng(num_ranks * 1000 + num_experts)
    topk = random_topk(rng, n, num_topk, num_experts, 0.1)
    for nvl in (num_ranks, max(1, num_ranks // 2)):
        got = C.oracle_get_dispatch_layout(topk, num_experts, num_ranks, nvl)
        want = ref_layout(topk, num_experts, num_ranks, nvl)
        for name, g, w in zip(("num_tokens_per_rank", "num_tokens_per_rdma_rank", "num_tokens_per_expert",
                               "is_token_in_rank"), got, want):
            assert g.shape == w.shape and np.array_equal(g, w), f"{name} (nvl={nvl}): got {g}, want {w}"


def test_oracle_layout_rejects_bad_index(C):
    topk = np.array([[0, 4]], dtype=np.int64)
    with pytest.raises((ValueError, RuntimeError)):
        C.oracle_get_dispatch_layout(topk, 4, 2, 2)
    with pytest.raises((ValueError, RuntimeError)):
        C.oracle_get_dispatch_layout(np.array([[0, -2]], dtype=np.int64), 4, 2, 2)
    with pytest.raises((ValueError, RuntimeError)):
        C.oracle_get_dispatch_layout(np.array([[0, 1]], dtype=np.int64), 5, 2, 2)  # E % R != 0


# ---- oracle: dispatch ----------------------------------------------------------------------------


def _bf16_inputs(rng, num_ranks, ns, hidden, num_topk, num_experts, mask_frac, weights=True):
    inputs = []
    for r in range(num_ranks):
        n = ns[r]
        x = f32_to_bf16_bits(rng.integers(-8, 9, size=(n, hidden)).astype(np.float32))
        inputs.append({
            "x": np.ascontiguousarray(x).view(np.uint8).reshape(n, hidden * 2),
            "x_scales": None,
            "topk_idx": random_topk(rng, n, num_topk, num_experts, mask_frac),
            "topk_weights": rng.random((n, num_topk), dtype=np.float32) if weights else None,
        })
    return inputs


def _compare_dispatch(got, want, has_weights):
    for r, (g, w) in enumerate(zip(got, want)):
        assert g["num_recv_tokens"] == w["recv_x"].shape[0], f"rank {r}: num_recv_tokens"
        for key in ("recv_x", "recv_topk_idx", "recv_src_idx", "rank_prefix_matrix"):
            assert g[key].shape == w[key].shape and np.array_equal(g[key], w[key]), (
                f"rank {r}: {key} differs: got {g[key].shape} {g[key].ravel()[:16]}, want {w[key].shape} "
                f"{w[key].ravel()[:16]}")
        assert list(g["num_recv_tokens_per_expert"]) == w["num_recv_tokens_per_expert"], f"rank {r}: per expert"
        if w["recv_x_scales"] is not None:
            assert np.array_equal(g["recv_x_scales"].view(np.uint32), w["recv_x_scales"].view(np.uint32))
        else:
            assert g["recv_x_scales"] is None
        if has_weights:
            assert np.array_equal(g["recv_topk_weights"], w["recv_topk_weights"]), f"rank {r}: recv_topk_weights"
        else:
            assert g["recv_topk_weights"] is None


def test_oracle_dispatch_by_hand(C):
    # R = 2, E = 4, H = 128, K = 2: rank 0 has tokens t0 -> {e0, e3}, t1 -> {e1}; rank 1 has t0 -> {e2}.
    hidden = 128
    x0 = np.stack([np.full(hidden, 1.0), np.full(hidden, 2.0)]).astype(np.float32)
    x1 = np.full((1, hidden), 3.0, dtype=np.float32)
    inputs = [
        {"x": f32_to_bf16_bits(x0).view(np.uint8).reshape(2, -1), "x_scales": None,
         "topk_idx": np.array([[0, 3], [1, -1]], dtype=np.int64),
         "topk_weights": np.array([[0.5, 0.25], [1.0, 7.0]], dtype=np.float32)},
        {"x": f32_to_bf16_bits(x1).view(np.uint8).reshape(1, -1), "x_scales": None,
         "topk_idx": np.array([[2, -1]], dtype=np.int64),
         "topk_weights": np.array([[0.125, 9.0]], dtype=np.float32)},
    ]
    out = C.oracle_dispatch(2, hidden, 2, False, 2, 4, 1, inputs)
    assert [o["num_recv_tokens"] for o in out] == [2, 2]
    # rank 0 receives rank 0's t0, t1 ; rank 1 receives rank 0's t0 then rank 1's t0
    assert out[0]["recv_src_idx"].tolist() == [0, 1] and out[1]["recv_src_idx"].tolist() == [0, 0]
    assert out[0]["recv_topk_idx"].tolist() == [[0, -1], [1, -1]]
    assert out[1]["recv_topk_idx"].tolist() == [[-1, 1], [0, -1]]
    assert out[0]["recv_topk_weights"].tolist() == [[0.5, 0.0], [1.0, 0.0]]
    assert out[1]["recv_topk_weights"].tolist() == [[0.0, 0.25], [0.125, 0.0]]
    assert out[0]["num_recv_tokens_per_expert"] == [1, 1] and out[1]["num_recv_tokens_per_expert"] == [1, 1]
    assert out[0]["rank_prefix_matrix"].tolist() == [[2, 1], [2, 2]]
    values1 = bf16_bits_to_f32(out[1]["recv_x"].view(np.uint16))
    assert values1[0, 0] == 1.0 and values1[1, 0] == 3.0
    aligned = C.oracle_dispatch(2, hidden, 2, False, 2, 4, 128, inputs)
    assert aligned[0]["num_recv_tokens_per_expert"] == [128, 128]


@pytest.mark.parametrize("num_ranks,ns,hidden,num_topk,num_experts,align,fp8", [
    (2, [5, 0], 256, 1, 2, 1, False),
    (4, [33, 7, 0, 20], 512, 6, 64, 128, True),
    (8, [16] * 8, 256, 8, 256, 1, False),
    (4, [0, 0, 0, 0], 128, 2, 8, 1, True),
])
def test_oracle_dispatch_random(C, num_ranks, ns, hidden, num_topk, num_experts, align, fp8):
    rng = np.random.default_rng(sum(ns) + hidden)
    inputs = []
    for r in range(num_ranks):
        n = ns[r]
        row = hidden * (1 if fp8 else 2)
        inputs.append({
            "x": rng.integers(0, 256, size=(n, row), dtype=np.uint8),
            "x_scales": rng.random((n, hidden // 128), dtype=np.float32) if fp8 else None,
            "topk_idx": random_topk(rng, n, num_topk, num_experts, 0.15),
            "topk_weights": rng.random((n, num_topk), dtype=np.float32),
        })
    got = C.oracle_dispatch(num_ranks, hidden, 1 if fp8 else 2, fp8, num_topk, num_experts, align, inputs)
    _compare_dispatch(got, ref_dispatch(num_ranks, num_experts, align, inputs), True)
    # column-major (transposed view) scales give the same result
    if fp8:
        for inp in inputs:
            inp["x_scales"] = np.asfortranarray(inp["x_scales"])
        got2 = C.oracle_dispatch(num_ranks, hidden, 1, True, num_topk, num_experts, align, inputs)
        _compare_dispatch(got2, ref_dispatch(num_ranks, num_experts, align, inputs), True)
    # without weights
    for inp in inputs:
        inp["topk_weights"] = None
    got3 = C.oracle_dispatch(num_ranks, hidden, 1 if fp8 else 2, fp8, num_topk, num_experts, align, inputs)
    _compare_dispatch(got3, ref_dispatch(num_ranks, num_experts, align, inputs), False)


# ---- oracle: combine -----------------------------------------------------------------------------


@pytest.mark.parametrize("num_ranks,ns,num_topk,num_experts", [(2, [9, 4], 1, 2), (4, [40, 0, 13, 27], 6, 64),
                                                               (8, [12] * 8, 8, 256)])
def test_oracle_combine_roundtrip(C, num_ranks, ns, num_topk, num_experts):
    """combine(dispatch(x)) = bias0 + bias1 + x * (number of receiving ranks), exact for small ints."""
    hidden = 256
    rng = np.random.default_rng(7 + num_ranks)
    inputs = _bf16_inputs(rng, num_ranks, ns, hidden, num_topk, num_experts, 0.1)
    out = C.oracle_dispatch(num_ranks, hidden, 2, False, num_topk, num_experts, 1, inputs)
    biases = [(f32_to_bf16_bits(rng.integers(-4, 5, size=(n, hidden)).astype(np.float32)),
               f32_to_bf16_bits(rng.integers(-4, 5, size=(n, hidden)).astype(np.float32))) for n in ns]
    for use_bias in (0, 1, 2):
        combine_inputs = [{
            "x": np.ascontiguousarray(o["recv_x"]).view(np.uint16).reshape(o["num_recv_tokens"], hidden),
            "topk_weights": o["recv_topk_weights"],
            "bias0": biases[r][0] if use_bias >= 1 else None,
            "bias1": biases[r][1] if use_bias >= 2 else None,
        } for r, o in enumerate(out)]
        combined = C.oracle_combine(num_ranks, hidden, num_topk, inputs, out, combine_inputs, num_experts=num_experts)
        for r in range(num_ranks):
            x = bf16_bits_to_f32(inputs[r]["x"].view(np.uint16).reshape(ns[r], hidden))
            count = ref_layout(inputs[r]["topk_idx"], num_experts, num_ranks, num_ranks)[3].sum(axis=1)
            want = x * count[:, None]
            if use_bias >= 1:
                want = want + bf16_bits_to_f32(biases[r][0])
            if use_bias >= 2:
                want = want + bf16_bits_to_f32(biases[r][1])
            got = combined[r]["combined_x"]
            assert got.dtype == np.uint16 and got.shape == (ns[r], hidden)
            assert np.array_equal(bf16_bits_to_f32(got), want.astype(np.float32)), f"rank {r}, bias {use_bias}"
            topk = inputs[r]["topk_idx"]
            want_w = np.where(topk >= 0, inputs[r]["topk_weights"], np.float32(0))
            assert np.array_equal(combined[r]["combined_topk_weights"], want_w), f"rank {r}: weights"


def test_oracle_combine_accumulates_in_float32(C):
    """bias0 = 1, two ranks each add 2^-8: float32 accumulation then one rounding gives 1 + 2^-7, while
    rounding after every addition would give 1."""
    hidden = 128
    inputs = [{"x": np.zeros((1, hidden * 2), np.uint8), "x_scales": None,
               "topk_idx": np.array([[0, 1]], dtype=np.int64), "topk_weights": None},
              {"x": np.zeros((0, hidden * 2), np.uint8), "x_scales": None,
               "topk_idx": np.zeros((0, 2), dtype=np.int64), "topk_weights": None}]
    out = C.oracle_dispatch(2, hidden, 2, False, 2, 2, 1, inputs)
    assert [o["num_recv_tokens"] for o in out] == [1, 1]
    small = np.full((1, hidden), 0x3B80, dtype=np.uint16)  # 2^-8
    combine_inputs = [{"x": small, "topk_weights": None, "bias0": np.full((1, hidden), 0x3F80, np.uint16),
                       "bias1": None},
                      {"x": small.copy(), "topk_weights": None, "bias0": np.zeros((0, hidden), np.uint16),
                       "bias1": None}]
    combined = C.oracle_combine(2, hidden, 2, inputs, out, combine_inputs, num_experts=2)
    assert combined[0]["combined_x"][0, 0] == 0x3F81, hex(int(combined[0]["combined_x"][0, 0]))
    assert combined[0]["combined_topk_weights"] is None
    assert combined[1]["combined_x"].shape == (0, hidden)


def test_oracle_combine_token_sent_nowhere(C):
    hidden = 128
    inputs = [{"x": np.zeros((2, hidden * 2), np.uint8), "x_scales": None,
               "topk_idx": np.array([[-1], [-1]], dtype=np.int64), "topk_weights": np.ones((2, 1), np.float32)}
              for _ in range(2)]
    out = C.oracle_dispatch(2, hidden, 2, False, 1, 4, 1, inputs)
    assert [o["num_recv_tokens"] for o in out] == [0, 0]
    bias = f32_to_bf16_bits(np.full((2, hidden), 5.0, np.float32))
    combine_inputs = [{"x": np.zeros((0, hidden), np.uint16), "topk_weights": np.zeros((0, 1), np.float32),
                       "bias0": bias, "bias1": None} for _ in range(2)]
    combined = C.oracle_combine(2, hidden, 1, inputs, out, combine_inputs, num_experts=4)
    for r in range(2):
        assert np.array_equal(combined[r]["combined_x"], bias)
        assert np.array_equal(combined[r]["combined_topk_weights"], np.zeros((2, 1), np.float32))


# ---- the low-latency oracle (src/oracle/low_latency_oracle.hpp) ---------------------------------
#
# Checked against small independent numpy versions of the interface's rules, since the GPU tests of
# the low-latency mode will trust it.


def _e4m3_table():
    """The float value of every e4m3 (fn) code, decoded independently (NaN for 0x7f / 0xff)."""
    values = np.zeros(256, dtype=np.float64)
    for code in range(256):
        e, m = (code >> 3) & 0xF, code & 7
        if e == 15 and m == 7:
            values[code] = np.nan
            continue
        v = m * 2.0 ** -9 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
        values[code] = -v if code & 0x80 else v
    return values


def _nearest_e4m3(values):
    """Nearest finite code, ties to the even code, saturating at +-448 (numpy, vectorized)."""
    table = _e4m3_table()[:0x7F]  # positive finite codes
    mag = np.minimum(np.abs(values.astype(np.float64)), 448.0)
    distance = np.abs(mag[:, None] - table[None, :])
    best = distance.min(axis=1, keepdims=True)
    candidates = distance == best
    # among equally near codes prefer the even one (only ties have two candidates)
    even = candidates & (np.arange(0x7F)[None, :] % 2 == 0)
    code = np.where(even.any(axis=1), even.argmax(axis=1), candidates.argmax(axis=1))
    return (code | np.where(np.signbit(values), 0x80, 0)).astype(np.uint8)


def test_ll_e4m3_encoding_matches_nearest_even(C):
    table = _e4m3_table()
    finite = [c for c in range(256) if not np.isnan(table[c])]
    for code in finite:
        assert C.oracle_ll_e4m3_to_float(code) == table[code]
    rng = np.random.default_rng(1)
    values = (np.exp2(rng.uniform(-14, 9.5, 3000)) * rng.choice([-1, 1], 3000)).astype(np.float32)
    mids = ((table[finite][:-1] + table[finite][1:]) / 2).astype(np.float32)
    values = np.concatenate([values, mids, np.float32([1e9, -1e9, 0.0, 464.0])])
    got = np.array([C.oracle_ll_float_to_e4m3(float(v)) for v in values], dtype=np.uint8)
    assert np.array_equal(got, _nearest_e4m3(values))


@pytest.mark.parametrize("round_scale,ue8m0", [(False, False), (True, False), (True, True)])
def test_ll_cast_fp8_rule(C, round_scale, ue8m0):
    rng = np.random.default_rng(2)
    n, H = 6, 1024
    x = (rng.normal(0, 2, (n, H)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits
    x[1, :128] = f32_to_bf16_bits(np.zeros(128))  # a zero group: amax floor 1e-4
    data, scales = C.oracle_ll_cast_fp8(x, round_scale=round_scale, use_ue8m0=ue8m0)
    xf = bf16_bits_to_f32(x).reshape(n, H // 128, 128)
    amax = np.maximum(np.abs(xf).max(axis=2), np.float32(1e-4)).astype(np.float32)
    scale = (amax / np.float32(448)).astype(np.float32)
    if round_scale:
        scale = np.exp2(np.ceil(np.log2(scale.astype(np.float64)))).astype(np.float32)
    want = _nearest_e4m3((xf / scale[:, :, None]).astype(np.float32).reshape(-1)).reshape(n, H)
    assert data.dtype == np.uint8 and np.array_equal(data, want)
    if ue8m0:
        exponent = (scale.view(np.uint32) >> 23).astype(np.uint32)  # [n, H/128]
        packed = exponent.reshape(n, H // 512, 4)
        words = packed[..., 0] | packed[..., 1] << 8 | packed[..., 2] << 16 | packed[..., 3] << 24
        assert scales.dtype == np.int32 and np.array_equal(scales.view(np.uint32), words)
    else:
        assert scales.dtype == np.float32 and np.array_equal(scales, scale)
    with pytest.raises(ValueError):
        C.oracle_ll_cast_fp8(x, round_scale=False, use_ue8m0=True)


def test_ll_routing_and_combine(C):
    rng = np.random.default_rng(3)
    R, L, K, T, H = 3, 4, 5, 16, 128
    E = R * L
    topk = []
    for r in range(R):
        idx = random_topk(rng, int(rng.integers(0, T + 1)), K, E, mask_frac=0.2)
        topk.append(idx)
    for masked in (None, [0, 1, 0]):
        world = C.oracle_ll_dispatch_routing(topk, E, T, masked=masked)
        m = masked or [0] * R
        for dst, (recv_count, rows) in enumerate(world):
            for i in range(L):
                want = {src: sorted(int(t) for t in range(len(topk[src])) for k in range(K)
                                    if topk[src][t, k] == dst * L + i and not m[src] and not m[dst])
                        for src in range(R)}
                assert [list(rows[i][src]) for src in range(R)] == [want[src] for src in range(R)]
                assert recv_count[i] == sum(len(v) for v in want.values())
        # combine of rank 0: y[t, k] = a per-(token, slot) bf16 row; weighted sum in float32, k ascending
        idx = topk[0]
        n = idx.shape[0]
        w = rng.random((n, K)).astype(np.float32)
        y = (rng.normal(0, 1, (n * K, H)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        got = C.oracle_ll_combine(idx, w, y, R, E, masked=masked)
        acc = np.zeros((n, H), dtype=np.float32)
        yf = bf16_bits_to_f32(y).reshape(n, K, H)
        for k in range(K):
            keep = (idx[:, k] >= 0) & np.array([not m[int(e) // L] if e >= 0 else False for e in idx[:, k]], bool)
            acc += np.where(keep[:, None], w[:, k:k + 1] * yf[:, k], np.float32(0))
        want_bits = (acc.view(np.uint32) + 0x7FFF + ((acc.view(np.uint32) >> 16) & 1)) >> 16  # bf16 RNE
        assert np.array_equal(got, want_bits.astype(np.uint16))
    a = rng.random(1000).astype(np.float32)
    assert C.oracle_calc_diff(a, a) == 0.0
    assert C.oracle_calc_diff(a, a + np.float32(1e-3)) < 9e-4


def test_ll_region_size_hint(C):
    """get_low_latency_rdma_size_hint: the C++ layout's size; DeepEP's test shape fits in less than
    DeepEP's 2147 MB; what the kernels cannot run is refused with ValueError."""
    two = C.low_latency_region_bytes_hint(128, 7168, 2, 288)
    assert two % 128 == 0 and 0 < two < 2147 * 10**6
    assert C.low_latency_region_bytes_hint(128, 7168, 8, 288) < 2147 * 10**6
    assert C.low_latency_region_bytes_hint(256, 7168, 2, 288) > two
    for bad in ((0, 7168, 2, 288), (128, 100, 2, 288), (128, 8320, 2, 288), (128, 7168, 2, 289),
                (128, 7168, 2, 4096)):
        with pytest.raises(ValueError):
            C.low_latency_region_bytes_hint(*bad)
    assert C.low_latency_plan_ints(2, 128, 8) == 2 + 2 * 128 * 9
    assert (C.kLowLatencySend, C.kLowLatencyReceive, C.kLowLatencyBoth) == (1, 2, 3)
