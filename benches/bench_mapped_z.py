"""Host share of ``compute_init`` on a statistics file written with ``out=`` (issue 26): one
input group's ``Z`` from the memory-mapped packed triangle into a reused buffer, the way
``init._input_mean_on`` prepares it for the GPU, side by side:

* before: ``InputFactor.from_packed`` (the core copies the triangle and zeroes a
  compensation of the same size) then ``mean_into``;
* now: ``InputFactor.packed_mean_into`` straight from the map.

    python benches/bench_mapped_z.py [--n 4096] [--repeats 5]

Median of the repeats, each group read twice (the second from the page cache, as a file
just written is). Prints a Markdown table last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from lora_da._core import num_threads
from lora_da.statistics_file import LazyInputFactors, Mapped


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 11008])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for n in args.n:
            path = Path(d) / f"z{n}.safetensors"
            save_file({"input.g": np.random.default_rng(0).standard_normal(n * (n + 1) // 2)}, str(path))
            lazy = LazyInputFactors(Mapped(path), {"g": {"n": n, "tokens": 32768}}, {"input.g"})
            out = np.empty((n, n))
            old, new = [], []
            for _ in range(args.repeats):
                t = time.perf_counter()
                lazy["g"].mean_into(out)
                old.append(time.perf_counter() - t)
                t = time.perf_counter()
                lazy.mean_into("g", out)
                new.append(time.perf_counter() - t)
            a, b = statistics.median(old), statistics.median(new)
            rows.append((n, a, b))
            os.remove(path)
    print(f"host threads {num_threads()}; median of {args.repeats}")
    print("| n | from_packed + mean_into (s) | packed_mean_into (s) | ratio |")
    print("|---:|---:|---:|---:|")
    for n, a, b in rows:
        print(f"| {n} | {a:.3f} | {b:.3f} | {b / a:.2f}× |")


if __name__ == "__main__":
    main()
