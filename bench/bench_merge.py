#!/usr/bin/env python3
"""Benchmark: what the correctly rounded merge costs per element, beside a float32 merge.

    python bench/bench_merge.py            # one gpt-oss-20b expert's gate_up (2880 x 5760), rank 16

Times, on one thread (as each build worker runs), for one expert matrix in GGUF orientation:

- the compiled kernel (``_kernels.c``, :mod:`lora2gguf.kernel`) reading W as a build does, stored
  bf16 bits in place (:class:`merge.Gather`): row by row, and transposed (GPT-OSS stores its
  experts (in, out), so a build reads them column by column);
- the numpy route on the same inputs (``LORA2GGUF_KERNEL=numpy``, or no compiler at install):
  the gather of the bits into float32 tiles included;
- ``merge_block`` (numpy) from W already in float32, and its steps on one tile, each on its own
  (matmul, add, max/min, float64 -> float32, bf16 rounding, candidates), to show where the time
  goes;
- ``float32 merge``: what the build did before issue 11 (``W + (B @ A) * s`` in float32, rounded
  to bf16 once from float32): its bits depend on BLAS's kernel choice;

and prints nanoseconds per element and the ratios. The compiled and numpy routes write the same
bytes (tests/test_merge_kernel.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from threadpoolctl import threadpool_limits

from lora2gguf import kernel, merge, numerics


def per_element(fn, n_elements: int, repeat: int) -> float:
    """Median nanoseconds per element of ``fn()`` over ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) / n_elements * 1e9


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=5760)
    p.add_argument("--cols", type=int, default=2880)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args(argv)
    n, m, k = args.rows, args.cols, args.rank
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((n, m)) * 0.02).astype(np.float32)
    left = rng.standard_normal((n, k)) * 0.01  # scale * B, float64
    right = rng.standard_normal((k, m)) * 0.01  # A
    out = np.empty((n, m), np.uint16)
    work = merge.Work()
    left32, right32 = left.astype(np.float32), right.astype(np.float32)
    acc = np.empty((n, m), np.float32)
    tmp = np.empty((n, m), np.uint32)

    def float32_merge():
        np.matmul(left32, right32, out=acc)
        np.add(acc, w, out=acc)
        numerics.bf16_round_into(acc.view(np.uint32), tmp, out)

    rows = merge.tile_rows(n, m)
    d = np.empty((rows, m))
    x = np.empty((rows, m), np.float32)
    t = np.empty((rows, m), np.uint32)
    o = np.empty((rows, m), np.uint16)
    tiles = range(0, n - rows + 1, rows)

    def each_tile(step):
        def run():
            for r0 in tiles:
                step(r0)
        return run

    steps = {
        "matmul (float64, rank k)": lambda r0: np.matmul(left[r0:r0 + rows], right, out=d),
        "add W": lambda r0: np.add(d, w[r0:r0 + rows], out=d),
        "max and min (bound, finiteness)": lambda r0: (d.max(), d.min()),
        "float64 -> float32": lambda r0: np.copyto(x, d, casting="unsafe"),
        "bf16 rounding": lambda r0: numerics.bf16_round_into(x.view(np.uint32), t, o),
        "candidates near a boundary": lambda r0: merge._bf16_candidates(x.view(np.uint32), t, 1e-15),
    }
    bits = numerics.f32_to_bf16_bits(w)
    bits_t = np.ascontiguousarray(bits.T)  # stored (in, out): the output rows are its columns
    gathers = {"rows": merge.Gather(bits, False, np.arange(n, dtype=np.int64)),
               "transposed": merge.Gather(bits_t, True, np.arange(n, dtype=np.int64))}

    def routed(g, compiled):
        lib = kernel._lib

        def run():
            kernel._lib = lib if compiled else None
            try:
                merge.merge_block(g, (n, m), left, right, "bf16", out=out, work=work)
            finally:
                kernel._lib = lib
        return run

    with threadpool_limits(limits=1, user_api="blas"):
        routes = {}
        for name, g in gathers.items():
            if kernel.available():
                routes[f"compiled kernel, stored bf16 read in place ({name})"] = per_element(routed(g, True), n * m,
                                                                                              args.repeat)
            routes[f"numpy route, stored bf16 gathered ({name})"] = per_element(routed(g, False), n * m, args.repeat)
        exact = per_element(lambda: merge.merge_block(w, (n, m), left, right, "bf16", out=out, work=work), n * m,
                            args.repeat)
        fast = per_element(float32_merge, n * m, args.repeat)
        parts = {name: per_element(each_tile(step), len(tiles) * rows * m, args.repeat) for name, step in steps.items()}
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, one thread; W {n} x {m}, rank {k}")
    print(f"merge kernel: {kernel.status()}")
    print("| merge | ns per element |")
    print("|---|---|")
    for name, v in routes.items():
        print(f"| {name} | {v:.2f} |")
    print(f"| lora2gguf merge_block (correctly rounded) | {exact:.2f} |")
    for name, v in parts.items():
        print(f"| - {name} | {v:.2f} |")
    print(f"| float32 merge (matmul, add, round; bits depend on BLAS) | {fast:.2f} |")
    print(f"| ratio, merge_block / float32 merge | {exact / fast:.2f}x |")
    for kind in gathers:
        c = routes.get(f"compiled kernel, stored bf16 read in place ({kind})")
        if c:
            print(f"| ratio, numpy / compiled route ({kind}) | "
                  f"{routes[f'numpy route, stored bf16 gathered ({kind})'] / c:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
