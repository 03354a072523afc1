"""Nsight Compute's warp-state samples of one kernel, by source line (what scripts/ll_ncu.sh
writes, matched to a local build's line table).

    python3 scripts/ncu_by_line.py ll_receive_sass.csv kernel.sass MANGLED_NAME [--rows 40]

- ll_receive_sass.csv: `ncu -i REPORT --page source --csv --print-source sass` (one table per
  profiled launch; every launch is summed).
- kernel.sass: `nvdisasm -c -gi` of a cubin built from the same source with the same flags and
  nvcc (the build's `-lineinfo` is enough; `ninja -t commands` gives the command, then `-cubin`).
- MANGLED_NAME: the kernel's symbol in kernel.sass, e.g.
  _ZN7flashep2ll8dispatchILb1ELi2EEEvNS_7kernels24LowLatencyDispatchParamsE.

Prints how many SASS opcodes matched (the two builds must agree: a mismatch means another nvcc or
other flags), then the lines with the most samples, each with its inline chain and top stall
reasons. The receive's profile in docs/results/2026-12-01-h200-r1-ncu.md was read this way.
"""
import argparse
import collections
import csv
import re
import sys


def line_table(sass_path, kernel):
    """Offset -> (opcode text, [file:line innermost first]) of `kernel` in an nvdisasm -gi dump."""
    table, current, pending, location = {}, None, [], []
    for line in open(sass_path):
        m = re.match(r"\.text\.(\S+):", line)
        if m:
            current, pending = m.group(1), []
            continue
        if current != kernel:
            continue
        m = re.search(r'//## File "([^"]+)", line (\d+)', line)
        if m:
            pending.append(f"{m.group(1).split('/')[-1]}:{m.group(2)}")
            continue
        m = re.match(r"\s+/\*([0-9a-f]+)\*/\s+(.*?)\s*;", line)
        if m:
            if pending:
                location, pending = pending, []
            table[int(m.group(1), 16)] = (m.group(2), location)
    return table


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("csv")
    parser.add_argument("sass")
    parser.add_argument("kernel")
    parser.add_argument("--rows", type=int, default=40)
    args = parser.parse_args()
    table = line_table(args.sass, args.kernel)
    if not table:
        sys.exit(f"ncu_by_line: no kernel {args.kernel} in {args.sass}")
    rows = list(csv.reader(open(args.csv, errors="replace")))
    headers = [i for i, r in enumerate(rows) if r and r[0] == "Address"] + [len(rows)]
    head = rows[headers[0]]
    samples_col = head.index("Warp Stall Sampling (All Samples)")
    stall_cols = [j for j, c in enumerate(head) if c.startswith("stall_") and "Not Issued" not in c]
    seen, matched, total = set(), 0, 0
    by_line, reasons = collections.Counter(), collections.defaultdict(collections.Counter)
    for k in range(len(headers) - 1):
        block = [r for r in rows[headers[k] + 1:headers[k + 1]] if len(r) == len(head)]
        if not block:
            continue
        key = tuple(r[2] for r in block[:50])  # ncu may print each launch's table twice
        if key in seen:
            continue
        first_launch = not seen
        seen.add(key)
        base = int(block[0][0], 16)
        for r in block:
            offset = int(r[0], 16) - base
            text, location = table.get(offset, ("?", []))
            if first_launch:
                total += 1
                matched += text.split()[0] == r[1].split()[0]
            where = " <- ".join(location[:3]) or "?"
            by_line[where] += number(r[samples_col])
            for j in stall_cols:
                if number(r[j]):
                    reasons[where][head[j][len("stall_"):]] += number(r[j])
    print(f"opcodes matched: {matched} of {total}; launches: {len(seen)}")
    everything = sum(by_line.values()) or 1.0
    for where, count in by_line.most_common(args.rows):
        top = ", ".join(f"{name} {value:.0f}" for name, value in reasons[where].most_common(3))
        print(f"{count:6.0f} {100 * count / everything:5.1f}%  {where[:100]:100s}  {top}")


if __name__ == "__main__":
    main()
