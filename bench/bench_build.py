#!/usr/bin/env python3
"""Benchmark: `lora2gguf build` on bases of real width, beside `cp` and the standard route.

    python bench/bench_build.py --layers 1,2 --standard --mxfp4          # gpt-oss-20b width
    python bench/bench_build.py --family llama --layers 1,2,4 --standard  # Llama-3.1-8B width
    python bench/bench_build.py --family qwen3_moe --layers 4 --standard  # Qwen3-30B-A3B width

--family llama: hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab 128,256 (the
Llama 3 tokenizer), a llama3 rope scaling, a rank-16 adapter on every linear module.
--family qwen3_moe: hidden 2048, 128 experts of width 768 (top 8), 32 heads, 4 KV heads, head_dim
128, vocab 151,936, a rank-16 adapter on attention and on every expert (one pair per expert).
Bases and adapters of these two are written by numpy (lora2gguf.testing.families).

For each layer count N it makes (once, cached under --workdir) a bf16 base of gpt-oss-20b width
(``synth.gpt_oss_config(**synth.REAL_WIDTH, num_hidden_layers=N)``) and a rank-16 adapter on
attention and experts (``synth.make_adapter_numpy``), and with --mxfp4 the same base with its
experts in the official MXFP4 layout (and an attention-only adapter for --keep-mxfp4). Then,
each as a subprocess under ``/usr/bin/time -v`` (wall time and "Maximum resident set size"):

- ``cp``: the input shards copied to the output disk, then ``sync`` of the copies (the build
  fsyncs its GGUF too, so both wait for the data to reach the disk);
- ``build``: ``lora2gguf.api.build(base, adapter, out)`` (BF16 GGUF, no quantization, no verify);
- with --standard (N <= 2): PEFT ``merge_and_unload`` + ``save_pretrained`` (bf16), then llama.cpp's
  ``convert_hf_to_gguf.py --outtype bf16`` on the merged folder;
- with --mxfp4: build from the MXFP4 base (decoded), and with --keep-mxfp4 experts kept.

Page cache: before every measured run the cache is dropped, then each input is read once and
the programs' Python packages imported once (lora2gguf's, and torch/transformers/PEFT and gguf-py
for the standard route), so every measured run reads inputs and code from a warm page cache, as
a user's second run would; lora2gguf and the converter's modules run from bytecode, as installed
ones do. The output is always written to disk and synced. Outputs are deleted after each measurement.
Prints a table and writes ``results-<family>.json`` in the workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
TIME = "/usr/bin/time"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
REFERENCE = Path(os.environ.get(
    "LORA2GGUF_REFERENCE_LLAMA_CPP",
    Path.home() / ".cache/lora2gguf/ref/llama_cpp_python-0.3.36/vendor/llama.cpp"))


# ---------------------------------------------------------------------------------------------
# inputs


def _done(folder: Path) -> bool:
    return (folder / ".bench-complete").exists()


def _mark(folder: Path) -> None:
    (folder / ".bench-complete").write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


#: real-width configs of the other benchmarked families
FAMILY_CONFIGS = {
    "llama": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                  vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                "original_max_position_embeddings": 8192},
                  bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    "qwen3_moe": dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4,
                      head_dim=128, vocab_size=151936, num_experts=128, num_experts_per_tok=8,
                      moe_intermediate_size=768, norm_topk_prob=True, max_position_embeddings=40960,
                      rope_theta=1000000.0, bos_token_id=None, eos_token_id=151645),
}


def make_family_inputs(workdir: Path, family: str, n_layers: int, rank: int, log) -> dict[str, Path]:
    from lora2gguf.testing import families
    from lora2gguf.testing import tokenizers as toks

    base = workdir / f"{family}-bf16-L{n_layers}"
    adapter = workdir / f"{family}-adapter-L{n_layers}-r{rank}"
    cfg = dict(FAMILY_CONFIGS[family], num_hidden_layers=n_layers)
    tok = toks.llama3_tokenizer if family == "llama" else toks.qwen3_tokenizer
    if not _done(base):
        shutil.rmtree(base, ignore_errors=True)
        t0 = time.perf_counter()
        log(f"making the {n_layers}-layer {family} base in {base} ...")
        families.make_base_numpy(base, family, cfg, tokenizer=tok)
        _mark(base)
        log(f"  done in {time.perf_counter() - t0:.0f} s")
    if not _done(adapter):
        shutil.rmtree(adapter, ignore_errors=True)
        if family == "qwen3_moe":
            families.make_per_expert_adapter(base, adapter, r=rank, lora_alpha=2 * rank)
        else:
            families.make_adapter_numpy(base, adapter, family, r=rank, lora_alpha=2 * rank)
        _mark(adapter)
    return {"base": base, "adapter": adapter}


def make_inputs(workdir: Path, n_layers: int, rank: int, mxfp4: bool, log, family: str = "gpt_oss") -> dict[str, Path]:
    from lora2gguf import synth

    if family != "gpt_oss":
        return make_family_inputs(workdir, family, n_layers, rank, log)
    base = workdir / f"bf16-L{n_layers}"
    adapter = workdir / f"adapter-L{n_layers}-r{rank}"
    out = {"base": base, "adapter": adapter}
    if not _done(base):
        shutil.rmtree(base, ignore_errors=True)
        t0 = time.perf_counter()
        log(f"making the {n_layers}-layer bf16 base in {base} ...")
        synth.make_base(base, synth.gpt_oss_config(**synth.REAL_WIDTH, num_hidden_layers=n_layers))
        _mark(base)
        log(f"  done in {time.perf_counter() - t0:.0f} s")
    if not _done(adapter):
        shutil.rmtree(adapter, ignore_errors=True)
        synth.make_adapter_numpy(base, adapter, r=rank, lora_alpha=2 * rank)
        _mark(adapter)
    if mxfp4:
        mx = workdir / f"mxfp4-L{n_layers}"
        attn = workdir / f"adapter-L{n_layers}-r{rank}-attn"
        if not _done(mx):
            shutil.rmtree(mx, ignore_errors=True)
            t0 = time.perf_counter()
            log(f"encoding the experts of {base.name} as MXFP4 in {mx} ...")
            to_mxfp4(base, mx)
            _mark(mx)
            log(f"  done in {time.perf_counter() - t0:.0f} s")
        if not _done(attn):
            shutil.rmtree(attn, ignore_errors=True)
            synth.make_adapter_numpy(base, attn, r=rank, lora_alpha=2 * rank, target_parameters=())
            _mark(attn)
        out.update(mxfp4=mx, adapter_attn=attn)
    return out


def to_mxfp4(src: Path, dest: Path) -> None:
    """The official gpt-oss layout (experts as MXFP4 blocks/scales), one expert at a time, so a
    real-width base converts in bounded memory (tests/quantized_layouts.py does whole tensors)."""
    from lora2gguf import numerics
    from lora2gguf.safetensors_io import INDEX_NAME, Checkpoint, StreamingWriter, TensorSpec

    sys.path.insert(0, str(REPO / "tests"))
    from quantized_layouts import MXFP4_QUANTIZATION_CONFIG

    expert_re = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")
    ck = Checkpoint.open(src)
    dest.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_file() and not p.name.endswith(".safetensors") and p.name not in ("config.json", INDEX_NAME) \
                and not p.name.startswith("."):
            shutil.copy2(p, dest / p.name)
    by_file: dict[Path, list[str]] = {}
    for name, info in ck.tensors.items():
        by_file.setdefault(info.path, []).append(name)
    weight_map = {}
    for path, names in by_file.items():
        specs = []
        for name in names:
            info = ck.info(name)
            if expert_re.match(name):
                e, fin, fout = info.shape
                specs += [TensorSpec(name + "_blocks", "U8", (e, fout, fin // 32, 16)),
                          TensorSpec(name + "_scales", "U8", (e, fout, fin // 32))]
            else:
                specs.append(TensorSpec(name, info.dtype, info.shape))
        specs.sort(key=lambda s: s.name)
        w = StreamingWriter(dest / path.name, specs, {"format": "pt"})
        for name in names:
            info = ck.info(name)
            if expert_re.match(name):
                e = info.shape[0]
                for k in range(e):
                    x = numerics.bf16_bits_to_f32(ck.raw(name, rows=slice(k, k + 1))[0])
                    blocks, scales = numerics.encode_mxfp4(np.ascontiguousarray(x.T))
                    w.write(name + "_blocks", blocks, byte_offset=k * blocks.nbytes)
                    w.write(name + "_scales", scales, byte_offset=k * scales.nbytes)
            else:
                rows = info.shape[0] if info.shape else 1
                step = max(1, (64 << 20) // max(1, info.nbytes // rows))
                if not info.shape:
                    w.write(name, ck.raw(name))
                for i in range(0, rows if info.shape else 0, step):
                    part = ck.raw(name, rows=slice(i, min(rows, i + step)))
                    w.write(name, part, byte_offset=i * (info.nbytes // rows))
        w.close()
        for s in specs:
            weight_map[s.name] = path.name
    index = json.loads((src / INDEX_NAME).read_text())
    index["weight_map"] = dict(sorted(weight_map.items()))
    index.setdefault("metadata", {})["total_size"] = sum(
        (dest / f).stat().st_size for f in set(weight_map.values()))
    (dest / INDEX_NAME).write_text(json.dumps(index, indent=2))
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = MXFP4_QUANTIZATION_CONFIG
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def shard_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in shard_files(folder))


# ---------------------------------------------------------------------------------------------
# measuring


def timed(cmd: list[str], *, env: dict | None = None) -> dict:
    """Run ``cmd`` under /usr/bin/time -v; wall seconds and peak RSS (bytes) as time reports them."""
    if not Path(TIME).exists():
        raise SystemExit(f"{TIME} is missing: apt-get install -y time")
    t0 = time.perf_counter()
    proc = subprocess.run([TIME, "-v", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-4000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    el = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", proc.stderr)
    parts = [float(p) for p in el.group(1).split(":")] if el else [wall]
    elapsed = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", proc.stderr))
    return {"wall_s": round(elapsed, 2), "cpu_s": round(cpu, 2),
            "peak_rss_bytes": int(m.group(1)) * 1024 if m else None, "load_avg_1min": round(os.getloadavg()[0], 2)}


#: what every measured program loads (lora2gguf; the standard route's torch, transformers, PEFT;
#: the converter's gguf-py), imported once by settle() so that it is in the page cache
WARM_IMPORTS = ("import numpy, tokenizers, jinja2, llama_cpp, lora2gguf.api, lora2gguf.doctor.checks, "
                "lora2gguf.vocab, lora2gguf.stream, lora2gguf.gguf_out\n"
                "try:\n import torch, transformers, peft, safetensors.torch\nexcept ImportError:\n pass")


def settle(folders: list[Path]) -> bool:
    """The same starting point for every measurement: dirty pages written, the page cache dropped
    (where permitted: root), then the inputs read once and the programs' Python packages imported
    once, so that both are cached, as for a user's second run. Returns whether the cache could be
    dropped."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        dropped = True
    except OSError:
        dropped = False
    files = [str(p) for f in folders for p in sorted(Path(f).iterdir()) if p.is_file()]
    subprocess.run(["sh", "-c", 'cat "$@" > /dev/null', "cat", *files], check=True)
    subprocess.run([sys.executable, "-c", WARM_IMPORTS], check=True)
    subprocess.run([sys.executable, "-c", "import gguf"], check=True,
                   env=dict(os.environ, PYTHONPATH=str(REFERENCE / "gguf-py")))
    return dropped


def summary(runs: list[dict]) -> dict:
    """Median wall and CPU of repeated runs (all of them kept), the largest peak RSS."""
    def med(key):
        vals = sorted(r[key] for r in runs if r.get(key) is not None)
        return vals[len(vals) // 2] if vals else None
    return {"wall_s": med("wall_s"), "cpu_s": med("cpu_s"),
            "peak_rss_bytes": max((r["peak_rss_bytes"] or 0) for r in runs),
            "load_avg_1min": med("load_avg_1min"), "runs": runs}


def compile_bytecode(log) -> None:
    """Every measured Python program starts as an installed one does: from bytecode. With
    PYTHONDONTWRITEBYTECODE set (this machine's shells set it) a source checkout is compiled at
    every start, ~0.3 s of lora2gguf's imports that no pip-installed copy pays; the converter's
    gguf-py and conversion modules likewise. So: compiled once here, and the variable unset for
    the children."""
    import compileall

    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.dont_write_bytecode = False
    for folder in (REPO / "src" / "lora2gguf", REFERENCE / "gguf-py", REFERENCE / "conversion"):
        if folder.is_dir():
            compileall.compile_dir(str(folder), quiet=1)
    if (REFERENCE / "convert_hf_to_gguf.py").is_file():
        compileall.compile_file(str(REFERENCE / "convert_hf_to_gguf.py"), quiet=1)
    log("bytecode compiled (lora2gguf, llama.cpp's converter); children run with bytecode")


def cp_cmd(src: Path, dst: Path) -> list[str]:
    files = " ".join(f"'{p}'" for p in shard_files(src))
    return ["sh", "-c", f"mkdir -p '{dst}' && cp {files} '{dst}/' && sync '{dst}'/*.safetensors"]


def child(args: list[str]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "_child", *args]


def run_child(argv: list[str]) -> None:
    """In the measured subprocess."""
    what = argv[0]
    if what == "build":
        from lora2gguf.api import build

        base, adapter, out, keep = argv[1], argv[2], argv[3], argv[4] == "keep"
        kwargs = {"keep_mxfp4": True} if keep else {}
        build(base, adapter, out, name="bench", **kwargs)
    elif what == "peft":
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base, adapter, out = argv[1:4]
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model.save_pretrained(out)
        for f in Path(adapter).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
                shutil.copy(f, Path(out) / f.name)
    else:
        raise SystemExit(f"unknown child {what!r}")


def measure(n: int, inputs: dict[str, Path], scratch: Path, standard: bool, mxfp4: bool, log,
            repeat: int = 3) -> dict:
    base, adapter = inputs["base"], inputs["adapter"]
    size = shard_bytes(base)
    row: dict = {"layers": n, "input_bytes": size}

    def fresh(p: Path) -> Path:
        shutil.rmtree(p, ignore_errors=True)
        return p

    # cp and build alternate, `repeat` times each, every run from the same settled state
    cps, builds = [], []
    for i in range(repeat):
        log(f"[{n} layers] cp ({i + 1}/{repeat}) ...")
        row["cache_dropped"] = settle([base, adapter])
        cps.append(timed(cp_cmd(base, fresh(scratch / "cp"))))
        shutil.rmtree(scratch / "cp")
        log(f"[{n} layers] build ({i + 1}/{repeat}) ...")
        settle([base, adapter])
        builds.append(timed(child(["build", str(base), str(adapter), str(fresh(scratch / "build")), "-"])))
        builds[-1]["output_bytes"] = sum(p.stat().st_size for p in (scratch / "build").glob("*.gguf"))
        shutil.rmtree(scratch / "build")
    row["cp"], row["build"] = summary(cps), summary(builds)
    row["build"]["output_bytes"] = builds[-1]["output_bytes"]
    if mxfp4:
        mx = inputs["mxfp4"]
        row["mxfp4_input_bytes"] = shard_bytes(mx)
        log(f"[{n} layers] build from MXFP4 ...")
        settle([mx, adapter])
        row["build_mxfp4"] = timed(child(["build", str(mx), str(adapter), str(fresh(scratch / "mx")), "-"]))
        shutil.rmtree(scratch / "mx")
        log(f"[{n} layers] build from MXFP4 --keep-mxfp4 ...")
        settle([mx, inputs["adapter_attn"]])
        row["build_keep_mxfp4"] = timed(child(["build", str(mx), str(inputs["adapter_attn"]),
                                               str(fresh(scratch / "keep")), "keep"]))
        row["build_keep_mxfp4"]["output_bytes"] = sum(p.stat().st_size for p in (scratch / "keep").glob("*.gguf"))
        shutil.rmtree(scratch / "keep")
        settle([mx])
        row["cp_mxfp4"] = timed(cp_cmd(mx, fresh(scratch / "cp")))
        shutil.rmtree(scratch / "cp")
    if standard:
        log(f"[{n} layers] standard route: PEFT merge_and_unload + save_pretrained ...")
        merged = fresh(scratch / "merged")
        settle([base, adapter])
        row["peft_merge"] = timed(child(["peft", str(base), str(adapter), str(merged)]))
        log(f"[{n} layers] standard route: convert_hf_to_gguf.py --outtype bf16 ...")
        env = dict(os.environ, PYTHONPATH=str(REFERENCE / "gguf-py"), NO_LOCAL_GGUF="")
        settle([merged])
        row["convert"] = timed([sys.executable, str(REFERENCE / "convert_hf_to_gguf.py"), str(merged),
                                "--outfile", str(scratch / "standard.gguf"), "--outtype", "bf16"], env=env)
        shutil.rmtree(merged)
        (scratch / "standard.gguf").unlink()
        row["standard"] = {"wall_s": round(row["peft_merge"]["wall_s"] + row["convert"]["wall_s"], 2),
                           "peak_rss_bytes": max(row["peft_merge"]["peak_rss_bytes"],
                                                 row["convert"]["peak_rss_bytes"])}
    return row


# ---------------------------------------------------------------------------------------------
# report


def gb(x: int | None) -> str:
    return "-" if x is None else f"{x / 1e9:.2f}"


def spread(m: dict) -> str:
    """' [min-max]' of the wall times of repeated runs (the cell shows their median)."""
    walls = [r["wall_s"] for r in m.get("runs", [])]
    return f" [{min(walls):.1f}-{max(walls):.1f}]" if len(walls) > 1 else ""


def table(rows: list[dict]) -> str:
    head = ["layers", "input GB", "cp s (CPU s)", "build s (CPU s)", "build MB/s", "build peak RSS GB",
            "build/cp wall", "standard s (merge + convert)", "standard CPU s", "standard peak RSS GB (merge / convert)",
            "standard/build wall (CPU)", "load avg"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        b, c, std = r["build"], r["cp"], r.get("standard")
        cells = [str(r["layers"]), gb(r["input_bytes"]), f"{c['wall_s']:.1f} ({c.get('cpu_s', 0):.1f}){spread(c)}",
                 f"{b['wall_s']:.1f} ({b.get('cpu_s', 0):.1f}){spread(b)}",
                 f"{r['input_bytes'] / 1e6 / b['wall_s']:.0f}", gb(b["peak_rss_bytes"]),
                 f"{b['wall_s'] / c['wall_s']:.2f}"]
        if std:
            std_cpu = r["peft_merge"].get("cpu_s", 0) + r["convert"].get("cpu_s", 0)
            cells += [f"{std['wall_s']:.1f} ({r['peft_merge']['wall_s']:.1f} + {r['convert']['wall_s']:.1f})",
                      f"{std_cpu:.1f}",
                      f"{gb(r['peft_merge']['peak_rss_bytes'])} / {gb(r['convert']['peak_rss_bytes'])}",
                      f"{std['wall_s'] / b['wall_s']:.1f}x ({std_cpu / max(b.get('cpu_s', 0), 1e-9):.1f}x)"]
        else:
            cells += ["-", "-", "-", "-"]
        cells.append(f"{b.get('load_avg_1min', 0):.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    mx = [r for r in rows if "build_mxfp4" in r]
    if mx:
        head = ["layers", "MXFP4 input GB", "cp s (CPU s)", "build, decoded s (CPU s)", "peak RSS GB",
                "--keep-mxfp4 s (CPU s)", "peak RSS GB", "GGUF GB (keep)", "BF16-path peak RSS GB"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in mx:
            d, k, c = r["build_mxfp4"], r["build_keep_mxfp4"], r["cp_mxfp4"]
            lines.append(f"| {r['layers']} | {gb(r['mxfp4_input_bytes'])} | {c['wall_s']:.1f} ({c.get('cpu_s', 0):.1f}) | "
                         f"{d['wall_s']:.1f} ({d.get('cpu_s', 0):.1f}) | {gb(d['peak_rss_bytes'])} | "
                         f"{k['wall_s']:.1f} ({k.get('cpu_s', 0):.1f}) | "
                         f"{gb(k['peak_rss_bytes'])} | {gb(k['output_bytes'])} | {gb(r['build']['peak_rss_bytes'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_child":
        run_child(argv[1:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default="1,2,4", help="comma-separated layer counts (default 1,2,4)")
    p.add_argument("--family", default="gpt_oss", choices=["gpt_oss", "llama", "qwen3_moe"],
                   help="gpt_oss (gpt-oss-20b width), llama (Llama-3.1-8B width), qwen3_moe (Qwen3-30B-A3B width)")
    p.add_argument("--workdir", default=str(Path.home() / ".cache/lora2gguf/bench"))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3, help="runs of cp and of build each, alternating (default 3); "
                   "the table shows medians")
    p.add_argument("--standard", action="store_true", help="also the standard route (for 1 and 2 layers; ~7 GB RSS)")
    p.add_argument("--mxfp4", action="store_true", help="also from the MXFP4 base (decoded, and --keep-mxfp4)")
    p.add_argument("--prepare-only", action="store_true", help="make the inputs and stop")
    p.add_argument("--remove-bases", action="store_true", help="delete each base after measuring it (disk)")
    p.add_argument("--table", nargs="+", metavar="RESULTS_JSON", help="print the table of earlier results.json files")
    args = p.parse_args(argv)
    if args.table:
        infos = [json.loads(Path(f).read_text()) for f in args.table]
        rows = sorted((r for i in infos for r in i["rows"]), key=lambda r: r["layers"])
        print("; ".join(sorted({f"{i['date']}, {i['machine']}" for i in infos})))
        print(table(rows))
        return 0
    workdir = Path(args.workdir).expanduser()
    workdir.mkdir(parents=True, exist_ok=True)
    scratch = workdir / "scratch"

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    compile_bytecode(log)
    layers = [int(x) for x in args.layers.split(",") if x.strip()]
    rows = []
    for n in layers:
        inputs = make_inputs(workdir, n, args.rank, args.mxfp4 and args.family == "gpt_oss", log, args.family)
        if args.prepare_only:
            continue
        free = shutil.disk_usage(workdir).free
        need = 3 * shard_bytes(inputs["base"])
        if free < need:
            raise SystemExit(f"{workdir}: {free / 1e9:.1f} GB free, ~{need / 1e9:.1f} GB needed for {n} layers")
        rows.append(measure(n, inputs, scratch, args.standard and (n <= 2 or args.family != "gpt_oss"),
                            args.mxfp4 and args.family == "gpt_oss", log, repeat=args.repeat))
        rows[-1]["family"] = args.family
        log(json.dumps(rows[-1]))
        if args.remove_bases:
            for k in ("base", "mxfp4"):
                if k in inputs:
                    shutil.rmtree(inputs[k], ignore_errors=True)
    if args.prepare_only:
        return 0
    shutil.rmtree(scratch, ignore_errors=True)
    info = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(), "rows": rows}
    (workdir / f"results-{args.family}.json").write_text(json.dumps(info, indent=2))
    print(f"{info['date']}, {info['machine']}")
    print(table(rows))
    return 0


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}"


if __name__ == "__main__":
    sys.exit(main())
