"""`lora2gguf doctor BASE ADAPTER [--json]`: the command-line face of :func:`lora2gguf.doctor.run`.

The lead registers it with ``add_parser(subparsers)``; ``main(args)`` returns the exit code
(0 clean, 1 warnings only, 2 blockers).
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("doctor", help="check a base + adapter pair before converting",
                              description="Inspect a base model folder and a PEFT LoRA adapter folder (configs, "
                                          "tokenizers, safetensors headers; no tensor data of the base) and list the "
                                          "problems with their fixes. Exit code: 0 clean, 1 warnings, 2 blockers.")
    add_arguments(p)
    p.set_defaults(func=main)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="base model folder (config.json, *.safetensors, tokenizer files), or a hub id "
                                "org/name[@revision] (from the Hugging Face cache; if not there, only its small files "
                                "and safetensors headers are fetched)")
    p.add_argument("adapter", help="PEFT adapter folder (adapter_config.json, adapter_model.safetensors), or a hub id")
    p.add_argument("--base-revision", default=None, help="branch, tag or commit of a hub id BASE")
    p.add_argument("--adapter-revision", default=None, help="branch, tag or commit of a hub id ADAPTER")
    p.add_argument("--out", dest="out_dir", default=None, help="output folder (its free space is checked)")
    p.add_argument("--outputs", default="BF16,Q4_K_M", help="comma-separated output types to size (default BF16,Q4_K_M)")
    p.add_argument("--tokenizer", choices=("auto", "adapter", "base"), default="auto")
    p.add_argument("--accept", action="append", default=[], metavar="CODE",
                   help="mark a blocker as accepted (shown, and not counted for the exit code)")
    p.add_argument("--json", action="store_true", help="print the findings as JSON (schema lora2gguf.doctor/1)")
    p.add_argument("-v", "--verbose", action="store_true", help="show info findings in full")
    p.add_argument("--no-color", action="store_true")


def main(args: argparse.Namespace) -> int:
    from ..api import doctor
    from ..cli import ProgressBar
    from ..errors import Lora2GGUFError
    from .render import render_text

    bar = ProgressBar()
    try:
        report = doctor(args.base, args.adapter, out_dir=args.out_dir,
                        outputs=[o.strip() for o in args.outputs.split(",") if o.strip()], tokenizer=args.tokenizer,
                        base_revision=getattr(args, "base_revision", None),
                        adapter_revision=getattr(args, "adapter_revision", None), download_progress=bar)
    except Lora2GGUFError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        bar.close()
    accepted = {a.upper() for a in args.accept}
    if args.json:
        sys.stdout.write(report.to_json(accepted) + "\n")
    else:
        colour = sys.stdout.isatty() and not args.no_color
        sys.stdout.write(render_text(report, colour=colour, accepted=accepted, verbose=args.verbose))
    if report.blocking(accepted):
        return 2
    return 1 if any(f.severity == "warning" for f in report.findings) else 0


def standalone(argv: list[str] | None = None) -> int:
    """`python -m lora2gguf.doctor.cli BASE ADAPTER`, until the lead's CLI registers add_parser."""
    p = argparse.ArgumentParser(prog="lora2gguf doctor")
    add_arguments(p)
    return main(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(standalone())
