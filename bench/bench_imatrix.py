#!/usr/bin/env python3
"""Benchmark: the importance-matrix stage (llama.cpp's llama-imatrix) at gpt-oss-20b width.

    python bench/bench_imatrix.py --layers 2,4 --chunks 4

For each layer count N it takes bench_build.py's cached bf16 base of real width (hidden 2880,
64 heads, 8 KV heads, 32 experts of which 4 per token, vocab 201,088) and rank-16 adapter, builds
the BF16 GGUF once (``lora2gguf.api.build``, no quantization), then times
``lora2gguf.imatrix.compute`` (what ``build`` runs: llama-imatrix over the built-in calibration
text in the model's chat format, ``--chunks`` chunks of 512 tokens, every core) as a subprocess
under ``/usr/bin/time -v``: wall time, CPU time, peak RSS, seconds per token.

A model's per-token cost is the layers' (linear in N) plus the embedding and the output matrix's
(fixed; at this vocabulary the output matmul is a large share): the two layer counts give the
line t(N) = a + b N, and t(24) is what a gpt-oss-20b (24 layers) costs per token on this machine.
Prints the table and writes ``imatrix-results.json`` in the workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_build  # noqa: E402


def child(model: str, chunks: int, threads: int, out: str) -> None:
    """In the measured subprocess: the imatrix stage as build runs it."""
    from lora2gguf import imatrix as im
    from lora2gguf.arch import known
    from lora2gguf.llama_tools import find_tools
    from lora2gguf.verify.suite import load_suite

    t0 = time.perf_counter()
    data, n_tokens = im.prepare(Path(model), known()["gpt_oss"], None, load_suite(None).prompts)
    prep = time.perf_counter() - t0
    t1 = time.perf_counter()
    section = im.compute(find_tools(), Path(model), data, n_tokens, Path(out), context_length=131072,
                         threads=threads, max_chunks=chunks)
    run = time.perf_counter() - t1
    Path(out + ".result.json").write_text(json.dumps({"prepare_s": prep, "imatrix_s": run, "chunks": section["chunks"],
                                                      "chunk_size": section["chunk_size"], "tokens_in_data": n_tokens}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="2,4")
    p.add_argument("--chunks", type=int, default=4, help="chunks of 512 tokens per measurement (default 4)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workdir", default=str(Path.home() / ".cache/lora2gguf/bench"))
    p.add_argument("--child", nargs=4, metavar=("MODEL", "CHUNKS", "THREADS", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), int(args.child[2]), args.child[3])
        return 0
    work = Path(args.workdir)
    rows = []
    for n in [int(x) for x in args.layers.split(",")]:
        inputs = bench_build.make_inputs(work, n, 16, False, lambda m: print(m, file=sys.stderr))
        gguf_dir = work / f"imatrix-gguf-{n}"
        model = gguf_dir / "bench-BF16.gguf"
        if not model.is_file():
            from lora2gguf.api import build

            build(inputs["base"], inputs["adapter"], gguf_dir, name="bench")
        out = gguf_dir / "bench.imatrix.gguf"
        r = bench_build.timed([sys.executable, __file__, "--child", str(model), str(args.chunks), str(args.threads),
                               str(out)])
        res_file = Path(str(out) + ".result.json")
        res = json.loads(res_file.read_text())
        tokens = res["chunks"] * res["chunk_size"]
        rows.append({"layers": n, "gguf_bytes": model.stat().st_size, "threads": args.threads, **res,
                     "tokens": tokens, "wall_s": r["wall_s"], "cpu_s": r["cpu_s"], "peak_rss": r["peak_rss_bytes"],
                     "load_avg_1min": r["load_avg_1min"], "s_per_token": res["imatrix_s"] / tokens})
        out.unlink(missing_ok=True)
        res_file.unlink()
    if len(rows) >= 2:
        (x0, y0), (x1, y1) = [(r["layers"], r["s_per_token"]) for r in (rows[0], rows[-1])]
        b = (y1 - y0) / (x1 - x0)
        a = y0 - b * x0
        fit = {"fixed_s_per_token": a, "per_layer_s_per_token": b, "s_per_token_24_layers": a + 24 * b}
    else:
        fit = {}
    print("\n| layers | BF16 GGUF GB | chunks x tokens | imatrix s (wall) | CPU s | s/token | peak RSS GB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['gguf_bytes'] / 1e9:.2f} | {r['chunks']} x {r['chunk_size']} | "
              f"{r['imatrix_s']:.1f} ({r['wall_s']:.1f}) | {r['cpu_s']:.1f} | {r['s_per_token'] * 1e3:.1f} ms | "
              f"{r['peak_rss'] / 1e9:.2f} |")
    if fit:
        print(f"\nper token: {fit['fixed_s_per_token'] * 1e3:.1f} ms fixed + {fit['per_layer_s_per_token'] * 1e3:.2f} ms "
              f"per layer; 24 layers (gpt-oss-20b): {fit['s_per_token_24_layers'] * 1e3:.0f} ms per token, "
              f"{fit['s_per_token_24_layers'] * 512 / 60:.1f} min per 512-token chunk")
    result = {"machine": bench_build.machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "rows": rows, "fit": fit}
    (work / "imatrix-results.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
