#!/usr/bin/env python3
"""Fails (exit 1) when a pytest junit xml shows skips that must not happen (issue 7: tests that
cannot fail). Used by scripts/test.sh and scripts/gpu_check.sh after their pytest runs.

    python3 scripts/check_skips.py [--expect-gpus N] [--forbid-skips-in TEXT ...] JUNIT.xml ...

A skip is an error when:
  * --forbid-skips-in TEXT: the test's id (classname.name) or file contains TEXT (e.g. 'test_cpu':
    the CPU tests have nothing to wait for, so a skip there means they did not test anything);
  * --expect-gpus N: its reason mentions GPUs, CUDA or torch and the test needs <= N GPUs (the
    number in the reason, "needs 4 GPUs", else an 'R4' id), or how many it needs cannot be told.
    Tests needing more than N GPUs may skip. (dist_harness's strict mode, FLASHEP_TEST_EXPECT_GPUS,
    turns these skips into failures already; this catches skips that bypass the harness.)
A missing or unreadable xml, or one without any test, is an error too: then pytest did not run.
xfail results (junit 'skipped' of type pytest.xfail) are not skips.
"""
from __future__ import annotations

import argparse
import re
import sys
import xml.etree.ElementTree as ET
from typing import List, Optional

_GPU_WORDS = re.compile(r"gpu|cuda|torch", re.IGNORECASE)
_NEEDS_IN_REASON = re.compile(r"(\d+)\s+GPUs?\b", re.IGNORECASE)
_RANKS_IN_ID = re.compile(r"(?<![A-Za-z0-9])R(\d+)(?![0-9])")


def gpus_needed(test_id: str, reason: str) -> Optional[int]:
    """GPUs the test needs: from the skip reason ("needs 4 GPUs"), else its id ('[R4]'), else None."""
    match = _NEEDS_IN_REASON.search(reason) or _RANKS_IN_ID.search(test_id)
    return int(match.group(1)) if match else None


def check(path: str, expect_gpus: Optional[int], forbid: List[str]) -> List[str]:
    """Problems found in one junit xml (empty: fine); prints a one-line count."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as error:
        return [f"{path}: cannot read the junit xml ({type(error).__name__}: {error}); did pytest run?"]
    cases = list(root.iter("testcase"))
    if not cases:
        return [f"{path}: no test ran"]
    problems: List[str] = []
    skips = 0
    for case in cases:
        skipped = case.find("skipped")
        if skipped is None or skipped.get("type") == "pytest.xfail":
            continue
        test_id = f"{case.get('classname', '')}.{case.get('name', '')}".strip(".")
        where = case.get("file", "")
        reason = skipped.get("message") or (skipped.text or "").strip()
        skips += 1
        hits = [text for text in forbid if text in test_id or text in where]
        if hits:
            problems.append(f"{test_id}: skipped ({reason}), but tests matching {hits[0]!r} must never skip")
            continue
        if expect_gpus is not None and _GPU_WORDS.search(reason):
            needed = gpus_needed(test_id, reason)
            if needed is None:
                problems.append(f"{test_id}: skipped for a GPU/torch reason ({reason}) on a machine that "
                                f"should have {expect_gpus} GPUs, and how many GPUs it needs is not stated")
            elif needed <= expect_gpus:
                problems.append(f"{test_id}: needs {needed} GPUs, this machine should have {expect_gpus}, "
                                f"but it skipped: {reason}")
    allowed = skips - len(problems)
    print(f"check_skips: {path}: {len(cases)} tests, {skips} skipped"
          + (f" ({allowed} allowed)" if skips else ""))
    return problems


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--expect-gpus", type=int, metavar="N",
                        help="GPU-related skips of tests needing <= N GPUs are errors")
    parser.add_argument("--forbid-skips-in", action="append", default=[], metavar="TEXT",
                        help="any skip of a test whose id or file contains TEXT is an error (repeatable)")
    parser.add_argument("junit", nargs="+", help="pytest --junitxml files")
    args = parser.parse_args(argv)
    if args.expect_gpus is not None and args.expect_gpus < 0:
        parser.error("--expect-gpus must be >= 0")
    problems: List[str] = []
    for path in args.junit:
        problems.extend(check(path, args.expect_gpus, args.forbid_skips_in))
    if problems:
        print(f"check_skips: {len(problems)} problem(s):")
        for problem in problems:
            print(f"FAIL: {problem}")  # 'FAIL' first: gpu_check.sh quotes the last such line in its summary
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
