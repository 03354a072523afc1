"""The FLASHEP_* environment variables read by the Python layer: this table is the only place.

Each variable is read when it is needed (a Buffer reads them at construction), so tests may set
os.environ before building a Buffer. An empty value means the default. A value that does not parse
raises ValueError naming the variable. torch is not needed here.

    python -c "import flashep.env as e; print(e.describe())"

prints the table.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict


@dataclass(frozen=True)
class EnvVar:
    """One environment variable: its name, default, parser and meaning."""

    name: str
    default: Any
    parse: Callable[[str], Any]
    doc: str


def _parse_positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def _parse_non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be a non-negative integer")
    return value


def _parse_flag(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be 0 or 1")


VARIABLES: Dict[str, EnvVar] = {
    var.name: var
    for var in (
        EnvVar(
            "FLASHEP_TIMEOUT_S",
            100.0,
            _parse_positive_float,
            "Bound in seconds of every GPU spin-wait and host poll; a wait that exceeds it raises "
            "FlashepError (a RuntimeError) naming the rank and the phase. The C++ core reads it too "
            "when it is given no timeout; the Python layer passes it to Runtime explicitly.",
        ),
        EnvVar(
            "FLASHEP_NVL_DOMAIN_SIZE",
            0,
            _parse_non_negative_int,
            "Ranks per NVLink domain ('node'). 0 means min(group size, 8). Set it to e.g. 4 to run one "
            "8-GPU host as two nodes (the multi-node path: first version, tested on 2 GPUs as 2 nodes of 1).",
        ),
        EnvVar(
            "FLASHEP_INTERNODE_MAX_TOKENS",
            4096,
            _parse_non_negative_int,
            "Multi-node dispatch: the most tokens a rank may send in one call (every rank must use the "
            "same value). It sizes the rail stage (each forwarder lays out nodes x this many rows for "
            "the NVLink stage); the NVSHMEM region (num_rdma_bytes) may lower it further.",
        ),
        EnvVar(
            "FLASHEP_DEBUG_INITIAL_COUNTER",
            0,
            _parse_non_negative_int,
            "Testing: the value a Buffer's long-lived counters (barrier epoch, count sequence) start "
            "from, e.g. 4294967280 to run calls across the point where 32-bit counters wrap. Same on "
            "every rank.",
        ),
        EnvVar(
            "FLASHEP_CHECK_INPUTS",
            False,
            _parse_flag,
            "1: check topk_idx values (in [-1, num_experts)) on the host before each call (one "
            "device-to-host sync) and raise ValueError naming the bad value. 0: the GPU checks them and "
            "the error surfaces as a RuntimeError at the next wait.",
        ),
    )
}


def get(name: str) -> Any:
    """The parsed value of `name` (one of VARIABLES), or its default when unset or empty."""
    var = VARIABLES[name]
    text = os.environ.get(name, "").strip()
    if not text:
        return var.default
    try:
        return var.parse(text)
    except ValueError as error:
        raise ValueError(f"environment variable {name}={text!r}: {error}") from None


def timeout_s() -> float:
    return get("FLASHEP_TIMEOUT_S")


def nvl_domain_size() -> int:
    return get("FLASHEP_NVL_DOMAIN_SIZE")


def debug_initial_counter() -> int:
    value = get("FLASHEP_DEBUG_INITIAL_COUNTER")
    if value >= 2 ** 32:
        raise ValueError(f"environment variable FLASHEP_DEBUG_INITIAL_COUNTER={value}: must be < 2**32")
    return value


def internode_max_tokens() -> int:
    return get("FLASHEP_INTERNODE_MAX_TOKENS")


def check_inputs() -> bool:
    return get("FLASHEP_CHECK_INPUTS")


def describe() -> str:
    """A human-readable table of the variables, their defaults and current values."""
    lines = []
    for var in VARIABLES.values():
        current = os.environ.get(var.name)
        shown = "unset" if current is None else repr(current)
        lines.append(f"{var.name} (default {var.default!r}, now {shown})\n    {var.doc}")
    return "\n".join(lines)
