"""The command line: a thin layer over lora2gguf.api. It draws progress, prints the summary, and
turns library errors into one clear line and an exit code (no traceback for a user mistake)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from . import __version__
from .errors import Lora2GGUFError


class ProgressBar:
    """One line per stage, redrawn in place on a terminal: bar, percent, rate and ETA."""

    def __init__(self, stream=None):
        self.stream = stream if stream is not None else sys.stderr  # the stderr of now, not of import time
        self.tty = self.stream.isatty()
        self.stage = None
        self.total = None
        self.t0 = 0.0
        self.last = 0.0

    def __call__(self, stage: str, done: int, total: int, detail: str = "") -> None:
        now = time.monotonic()
        if stage != self.stage or total != self.total:  # a new stage, or a new job in it (another download)
            self.close()
            self.stage, self.total, self.t0, self.last = stage, total, now, 0.0
        finished = total and done >= total
        if not finished and now - self.last < (0.1 if self.tty else 5.0):
            return
        self.last = now
        frac = min(1.0, done / total) if total else 0.0
        elapsed = now - self.t0
        eta = (elapsed / frac - elapsed) if frac > 0 and elapsed > 0.5 else float("nan")
        width = 28
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        if total > 1 << 20:
            rate = f" {done / 2**20 / elapsed:,.0f} MiB/s" if elapsed > 0.5 else ""
            amount = f"{done / 2**20:,.0f}/{total / 2**20:,.0f} MiB{rate}"
        else:
            amount = f"{done}/{total}"
        eta_text = "done" if finished else ("ETA   ?s" if eta != eta else f"ETA {eta:4.0f}s")
        line = f"{stage:>9} [{bar}] {frac * 100:5.1f}% {amount} {eta_text} {detail[-40:]}"
        if self.tty:
            self.stream.write("\r\033[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.stage is not None and self.tty:
            self.stream.write("\n")
            self.stream.flush()
        self.stage = None


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return str(n)


def print_build_summary(result, out=None) -> None:
    out = out if out is not None else sys.stdout  # the stdout of now, not of import time
    rec = result.record
    out.write(f"\nlora2gguf {__version__}: wrote {len(result.outputs)} file(s) to {result.out_dir}\n")
    main_size = result.outputs[0].bytes if result.outputs else 0
    for o in result.outputs:
        rel = "" if o is result.outputs[0] else f"  ({(1 - o.bytes / main_size) * 100:.0f}% smaller)"
        types = ", ".join(f"{n} {t}" for t, n in o.tensor_types.items())
        out.write(f"  {o.file:<40} {_human(o.bytes):>10}  {o.seconds:6.1f} s  [{types}]{rel}\n")
        if o.note:
            out.write(f"    note: {o.note}\n")
    for note in result.notes:
        out.write(f"  note: {note}\n")
    tok = rec.get("tokenizer", {})
    out.write(f"  tokenizer: the {tok.get('source')}'s ({tok.get('reason')})\n")
    tech = rec.get("technical", {})
    out.write(f"  EOS {tech.get('eos_token')} (id {tech.get('eos_token_id')}); end-of-generation tokens "
              f"{tech.get('eog_tokens')}\n")
    st = rec.get("stages", {})
    build = st.get("build", {})
    out.write(f"  build {build.get('seconds', 0):.1f} s, read {_human(build.get('bytes_read', 0))}, "
              f"peak RSS {_human(build.get('peak_rss_bytes', 0))}; total {st.get('total', {}).get('seconds', 0):.1f} s\n")
    out.write(f"  record: {result.run_json}\n")
    if result.verify is not None:
        summary = getattr(result.verify, "summary", None)
        if callable(summary):
            out.write(summary() + "\n")
        else:
            report = getattr(result.verify, "report_path", None) or (result.out_dir / "REPORT.md")
            out.write(f"  report: {report}\n")


def cmd_build(args: argparse.Namespace) -> int:
    from .api import build
    from .errors import InputError

    if not args.adapters and not args.checkpoints:
        raise InputError("build needs an ADAPTER after BASE (a folder or a hub id), several, or --checkpoints RUN_DIR")
    from .quantrun import QuantOptions

    quants = QuantOptions.of(args.quant or "", imatrix=args.imatrix, imatrix_data=args.imatrix_data,
                             no_imatrix=args.no_imatrix, imatrix_chunks=args.imatrix_chunks,
                             tensor_types=args.tensor_type, output_tensor_type=args.output_tensor_type,
                             token_embedding_type=args.token_embedding_type, llama_cpp=args.llama_cpp,
                             keep_all=args.keep_all, auto_types=args.auto_types)
    options = dict(outtype=args.outtype, quants=quants, accept=[a.upper() for a in args.accept],
                   tokenizer=args.tokenizer, verify=not args.no_verify, nthread=args.threads,
                   command=["lora2gguf", *sys.argv[1:]], keep_mxfp4=args.keep_mxfp4,
                   verify_options=verify_kwargs(args), base_revision=args.base_revision,
                   adapter_revision=args.adapter_revision)
    if len(args.adapters) != 1 or args.checkpoints:
        return cmd_build_many(args, options)
    bar = ProgressBar()
    try:
        result = build(args.base, args.adapters[0], args.out, name=args.name, save_merged=args.save_merged,
                       progress=bar, lora_gguf=args.lora_gguf, base_gguf=args.base_gguf, **options)
    finally:
        bar.close()
    print_build_summary(result)
    failed = getattr(result.verify, "required_failed", None)
    return 3 if failed else 0


def print_adapter_summary(result, out=None) -> None:
    out = out if out is not None else sys.stdout
    o, lo = result.output, result.record.get("lora") or {}
    out.write(f"\nlora2gguf {__version__}: wrote {o.file} to {result.out_dir}\n")
    out.write(f"  {o.file:<40} {_human(o.bytes):>10}  {o.seconds:6.1f} s  {len(lo.get('tensors') or {})} adapted "
              f"tensors, adapter.lora.alpha {lo.get('alpha')}\n")
    folded = sum(1 for t in (lo.get("tensors") or {}).values() if any(x["fold"] != 1.0 for x in t["terms"]))
    if folded:
        out.write(f"  B rescaled in {folded} tensor(s) so that llama.cpp's alpha/rank gives PEFT's scale "
                  "(rsLoRA, rank_pattern, alpha_pattern)\n")
    for x in lo.get("left_out") or []:
        out.write(f"  left out (--accept {x['code']}): {x['what']}\n")
    for note in result.notes:
        out.write(f"  note: {note}\n")
    for p in lo.get("pairs") or []:
        out.write(f"  checked against {p.get('path') or p['file']} ({p.get('type')}, sha256 {p.get('sha256')})\n")
    if not lo.get("pairs"):
        out.write("  not checked against a base GGUF: pass --base-gguf FILE (a GGUF of the base, e.g. the "
                  "NAME-base-*.gguf of `lora2gguf build ... --lora-gguf`) to check it and verify it in llama.cpp\n")
    out.write(f"  run it: llama-cli -m BASE.gguf --lora {result.out_dir / o.file}\n")
    out.write(f"  record: {result.run_json}\n")
    if result.verify is not None:
        out.write(result.verify.summary() + "\n")


def cmd_adapter(args: argparse.Namespace) -> int:
    from .api import export_adapter

    bar = ProgressBar()
    try:
        result = export_adapter(args.base, args.adapter, args.out, name=args.name, outtype=args.outtype,
                                accept=[a.upper() for a in args.accept], base_gguf=args.base_gguf,
                                verify=not args.no_verify, verify_options=verify_kwargs(args), progress=bar,
                                command=["lora2gguf", *sys.argv[1:]])
    finally:
        bar.close()
    print_adapter_summary(result)
    failed = getattr(result.verify, "required_failed", None)
    return 3 if failed else 0


def cmd_build_many(args: argparse.Namespace, options: dict) -> int:
    """Several adapters on one base (or a run's checkpoints): one subfolder each, one comparison."""
    from .batch import build_many
    from .errors import InputError

    if args.save_merged:
        raise InputError("--save-merged takes one adapter; build the checkpoint you pick with it on its own")
    bar = ProgressBar()
    try:
        result = build_many(args.base, args.adapters, args.out, checkpoints=args.checkpoints, name=args.name,
                            rank_by=args.rank_by, progress=bar, **options)
    finally:
        bar.close()
    sys.stdout.write(result.summary() + "\n")
    return result.exit_code


def verify_kwargs(args: argparse.Namespace) -> dict:
    from .errors import InputError

    kwargs: dict = {}
    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise InputError(f"--text {args.text}: no such file")
        kwargs["text"] = path.read_text(encoding="utf-8")
    for name in ("suite", "reference", "samples", "max_tokens", "n_threads"):
        value = getattr(args, name, None)
        if value is not None:
            kwargs[name] = value
    if getattr(args, "no_speed", False):
        kwargs["speed"] = False
    if getattr(args, "rehash", False):
        kwargs["rehash"] = True
    return kwargs


def cmd_verify(args: argparse.Namespace) -> int:
    from .api import verify

    bar = ProgressBar()
    try:
        result = verify(args.out, progress=bar, **verify_kwargs(args))
    finally:
        bar.close()
    summary = getattr(result, "summary", None)
    if callable(summary):
        sys.stdout.write(summary() + "\n")
    return 3 if getattr(result, "required_failed", False) else 0


def add_verify_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", help="evaluation text file (default: built in)")
    p.add_argument("--suite", help="prompt suite YAML (default: built in, the seed report's four prompts)")
    p.add_argument("--reference", choices=("auto", "peft", "gguf"), default=None,
                   help="what the GGUFs are compared with: the fine-tune through transformers+PEFT, or the "
                        "unquantized GGUF (auto: PEFT when installed and memory allows)")
    p.add_argument("--samples", type=int, default=None, help="seeded samples per prompt besides greedy")
    p.add_argument("--max-tokens", dest="max_tokens", type=int, default=None, help="generation limit per prompt")
    p.add_argument("--verify-threads", dest="n_threads", type=int, default=None, help="llama.cpp threads for verify")
    p.add_argument("--no-speed", action="store_true", help="skip the tokens/s measurement")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    bar = ProgressBar()
    try:
        result = run_demo(args.workdir, config=args.config, progress=bar, ladder=args.ladder)
    finally:
        bar.close()
    sys.stdout.write(result.summary() + "\n")
    return 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora2gguf", description="A LoRA fine-tune in, trustworthy GGUF files out.")
    p.add_argument("--version", action="version", version=f"lora2gguf {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    from .doctor import cli as doctor_cli

    doctor_cli.add_parser(sub)

    b = sub.add_parser("build", help="merge the adapter while writing the GGUF, quantize, verify",
                       description="Merge a PEFT LoRA adapter into its base tensor by tensor while writing a GGUF, "
                                   "then quantize with llama.cpp and verify the files.")
    b.add_argument("base", help="base model: a folder (Hugging Face layout) or a hub id org/name[@revision], taken "
                                "from the Hugging Face cache when it is there")
    b.add_argument("adapters", nargs="*", metavar="ADAPTER",
                   help="PEFT adapter: a folder or a hub id; several are each converted against the one base "
                        "(OUT_DIR/<name>/ each, and a comparison report in OUT_DIR)")
    b.add_argument("-o", "--out", required=True, help="output folder")
    b.add_argument("--checkpoints", metavar="RUN_DIR",
                   help="convert every checkpoint-*/ adapter of a training run folder (and RUN_DIR's own adapter, "
                        "if it has one), compared in one report")
    b.add_argument("--base-revision", default=None, help="branch, tag or commit of a hub id BASE")
    b.add_argument("--adapter-revision", default=None, help="branch, tag or commit of hub id ADAPTERs")
    b.add_argument("--rank-by", metavar="TYPE", default=None,
                   help="with several adapters: the output type the comparison ranks them by (default: the first "
                        "--quant, else the --outtype)")
    b.add_argument("--name", help="file name stem (default: the adapter folder's or repo's name; with several "
                                  "adapters, NAME-<adapter>)")
    b.add_argument("--outtype", choices=("bf16", "f16", "f32"), default="bf16",
                   help="type of the unquantized GGUF (bf16 to ship; f32 to prove exactness)")
    b.add_argument("--quant", help="llama.cpp types, comma-separated, e.g. Q4_K_M,IQ4_XS,MXFP4_MOE,Q8_0; or auto "
                                   "(auto:KL, a mean-KL budget in nats, default 0.05): quantize a ladder of types, "
                                   "verify each against the fine-tune and keep the smallest within the budget")
    q = b.add_argument_group("importance matrix and per-tensor types",
                             "A matrix is computed by llama.cpp's llama-imatrix on the unquantized GGUF for every "
                             "type that uses one (all but the float types, Q8_0 and MXFP4_MOE), on the built-in "
                             "calibration text unless you give data")
    q.add_argument("--imatrix-data", metavar="FILE",
                   help="calibration data: JSONL of conversations ({\"messages\": [...]} per line), rendered with "
                        "the model's chat template, or a plain text file")
    q.add_argument("--imatrix", metavar="FILE", help="use this importance matrix (imatrix.gguf) instead of computing one")
    q.add_argument("--no-imatrix", action="store_true", help="quantize without an importance matrix")
    q.add_argument("--imatrix-chunks", type=int, default=None, metavar="N",
                   help="compute the matrix on at most N chunks of the data")
    q.add_argument("--tensor-type", action="append", default=[], metavar="PATTERN=TYPE",
                   help="quantize the tensors matching PATTERN (a regex, e.g. attn_v or 'blk\\.[0-3]\\.ffn_down') "
                        "as TYPE (q8_0, q6_k, ...), as llama-quantize --tensor-type (repeatable)")
    q.add_argument("--output-tensor-type", metavar="TYPE", help="type of output.weight (llama-quantize's option)")
    q.add_argument("--token-embedding-type", metavar="TYPE", help="type of the token embedding (llama-quantize's option)")
    q.add_argument("--llama-cpp", metavar="DIR",
                   help="a llama.cpp build (CUDA, Metal...) whose llama-imatrix and llama-quantize to run "
                        "(default: LORA2GGUF_LLAMA_CPP, else the ones scripts/setup.sh builds)")
    q.add_argument("--keep-all", action="store_true", help="with --quant auto: keep every candidate file")
    q.add_argument("--auto-types", metavar="T1,T2,...",
                   help="with --quant auto: the candidate types (default: Q8_0,Q6_K,Q5_K_M,Q4_K_M,IQ4_XS,Q3_K_M,"
                        "IQ3_XXS,IQ2_M, and MXFP4_MOE for a MoE model)")
    b.add_argument("--accept", action="append", default=[], metavar="CODE",
                   help="proceed despite the doctor finding CODE (repeatable; never a blanket force)")
    b.add_argument("--save-merged", metavar="DIR", help="also write the merged model as safetensors shards")
    b.add_argument("--tokenizer", default="auto", help="auto (the adapter's if it has one), adapter, base")
    b.add_argument("--keep-mxfp4", action="store_true",
                   help="MXFP4 base and experts untouched by the adapter: keep the experts MXFP4 in the GGUF")
    b.add_argument("--lora-gguf", nargs="?", const="f16", default=None, metavar="TYPE",
                   choices=("f32", "f16", "bf16", "q8_0"),
                   help="also write the adapter as a GGUF LoRA (NAME-LoRA-TYPE.gguf, default f16) and the base GGUFs "
                        "it pairs with (NAME-base-*.gguf, one per type), and verify base + LoRA beside the merged files")
    b.add_argument("--base-gguf", action="append", default=[], metavar="FILE",
                   help="with --lora-gguf: pair the LoRA GGUF with this base GGUF instead of writing one (repeatable)")
    b.add_argument("--no-verify", action="store_true", help="skip verify at the end")
    add_verify_options(b)
    b.add_argument("--threads", type=int, default=0, help="worker threads for the merge and for llama.cpp's quantizer (default: the usable cores; the merge uses at most 8)")
    b.set_defaults(func=cmd_build)

    a = sub.add_parser("adapter", help="write the adapter as a GGUF LoRA that llama.cpp applies on a base GGUF",
                       description="Write a PEFT LoRA adapter as a GGUF LoRA (NAME-LoRA-F16.gguf) for llama.cpp's "
                                   "--lora, Ollama's ADAPTER and llama-server, from the adapter and the base's config "
                                   "and headers alone (seconds). rsLoRA, rank_pattern and alpha_pattern are folded "
                                   "in; MoE expert LoRA is stacked per expert. With --base-gguf the pair is checked "
                                   "and verified in llama.cpp against the fine-tune.")
    a.add_argument("base", help="base model folder (Hugging Face layout: config.json and safetensors headers are read)")
    a.add_argument("adapter", help="PEFT adapter folder")
    a.add_argument("-o", "--out", required=True, help="output folder")
    a.add_argument("--name", help="file name stem (default: the adapter folder's name)")
    a.add_argument("--outtype", choices=("f32", "f16", "bf16", "q8_0"), default="f16",
                   help="type of lora_a / lora_b (llama.cpp multiplies in float32 whatever the type)")
    a.add_argument("--accept", action="append", default=[], metavar="CODE",
                   help="leave out a part llama.cpp cannot apply at load time (LORA_FULL_WEIGHTS, LORA_TOKEN_ROWS, "
                        "LORA_DORA, LORA_BIAS, LORA_NOT_APPLIED, LORA_TIED_EMBEDDING; repeatable); it is recorded")
    a.add_argument("--base-gguf", action="append", default=[], metavar="FILE",
                   help="a base GGUF to check the adapter against and verify it on (repeatable)")
    a.add_argument("--no-verify", action="store_true", help="with --base-gguf: check the pair but do not run verify")
    add_verify_options(a)
    a.set_defaults(func=cmd_adapter)

    v = sub.add_parser("verify", help="run the GGUFs of an output folder in llama.cpp and write the report")
    v.add_argument("out", help="output folder of a build (holds run.json)")
    add_verify_options(v)
    v.add_argument("--rehash", action="store_true",
                   help="first re-check the full SHA-256 of every output against the one recorded when it was "
                        "written (a rerun confirms unchanged files by size, times, inode and sampled bytes only)")
    v.set_defaults(func=cmd_verify)

    d = sub.add_parser("demo", help="the seed report's story on a built-in model trained on this CPU")
    d.add_argument("--workdir", default=None, help="where to write the demo's outputs (default: a cache folder)")
    d.add_argument("--config", choices=("full", "small"), default="full")
    d.add_argument("--ladder", action="store_true",
                   help="also --quant auto on the demo's models (an importance matrix on half of the fine-tune's "
                        "conversations, KL on the other half, every candidate kept): the README's quantization table")
    d.set_defaults(func=cmd_demo)
    return p


def _quiet_libraries() -> None:
    """The CLI draws its own progress: keep transformers/huggingface bars and advisories off the
    terminal (they are the reference model's loading chatter, not lora2gguf's progress)."""
    import warnings

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="peft")


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Lora2GGUFError as e:
        if args.debug:
            raise
        colour = sys.stderr.isatty() and "NO_COLOR" not in os.environ
        label = "\033[31merror:\033[0m" if colour else "error:"
        sys.stderr.write(f"{label} {e}\n")
        return e.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; finished files are intact, unfinished ones were removed. Rerun to resume.\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
