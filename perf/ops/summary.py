"""One markdown table from the per-op benchmarks' JSON (pytest-benchmark --benchmark-json).

    python -m perf.ops.summary ops_bench.json [--out ops_bench.md] [--title "NVIDIA H200, ..."]

A row per (shape, implementation) with the per-call figures perf/ops/timing.py put in
extra_info (time, GB/s and its fraction of the copy bandwidth, TFLOP/s, kernel launches) and, on
every other implementation's row, how many times faster d3kernels ran that shape. Last, the
shapes where d3kernels was slower than torch.compile (issue 9's goal: none) and, for weight-only
int4/int8 shapes (extra_info ``torch_path``), slower than torch's own weight-only op, the eager
row (issue 13's goal: none; where torch has no such op it dequantizes per call, and says so).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from perf.ops.timing import OURS


def _cell(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def markdown(data: dict, title: str = "") -> str:
    """The table of one benchmark JSON (see the module docstring)."""
    groups: dict[str, dict[str, dict]] = {}
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if "us" in info:
            groups.setdefault(bench.get("group") or bench["name"], {})[info.get("impl", "?")] = info
    lines = [title, ""] if title else []
    lines += ["| op and shape | impl | µs/call | GB/s (of copy) | TFLOP/s | launches | "
              "d3kernels speedup |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    slower, slower_q, quantized = [], [], 0
    for group, impls in groups.items():
        ours = impls.get(OURS)
        for impl in sorted(impls, key=lambda name: (name != OURS, name)):
            info = impls[impl]
            gbps = _cell(info.get("GBps"), ".0f")
            if gbps and "bw_fraction" in info:
                gbps += f" ({info['bw_fraction']:.0%})"
            speedup = ""
            if ours is not None and impl != OURS:
                ratio = info["us"] / ours["us"]
                speedup = f"{ratio:.2f}×"
                if impl == "compile" and ratio < 1:
                    slower.append(f"{group} ({ratio:.2f}×)")
                if impl == "eager" and "torch_path" in info:
                    quantized += 1
                    if ratio < 1:
                        slower_q.append(f"{group} ({ratio:.2f}×, torch {info['torch_path']})")
            lines.append(f"| {group} | {impl} | {info['us']:.1f} | {gbps} | "
                         f"{_cell(info.get('TFLOPs'), '.1f')} | "
                         f"{_cell(info.get('kernel_launches'), 'd')} | {speedup} |")
    compared = sum(OURS in impls and "compile" in impls for impls in groups.values())
    lines += ["", f"d3kernels at least as fast as torch.compile on "
                  f"{compared - len(slower)} of {compared} shapes"
                  + (f"; slower on: {', '.join(slower)}" if slower else "") + "."]
    if quantized:
        lines += [f"Weight-only int4/int8: d3kernels at least as fast as torch's own op (eager) "
                  f"on {quantized - len(slower_q)} of {quantized} shapes"
                  + (f"; slower on: {', '.join(slower_q)}" if slower_q else "") + "."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("json", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    text = markdown(json.loads(args.json.read_text()), args.title)
    if args.out is not None:
        args.out.write_text(text)
    print(text, end="")
    return text


if __name__ == "__main__":
    main()
