"""gisp-fx command line: parses flags into configs and calls the pipeline; no torch logic here."""

from __future__ import annotations

import argparse
import gc
import sys

from gisp_fx.errors import GispError


def _inspect(args: argparse.Namespace) -> None:
    from gisp_fx.inspect import inspect_model

    print(inspect_model(args.model, as_json=args.json))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gisp-fx",
        description="Structured pruning of Hugging Face causal LMs with GISP (global iterative structured pruning).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show the prunable groups of a model, per layer")
    p.add_argument("model", help="'smollm2' (bundled), a model folder, a .gguf file, or a hub id")
    p.add_argument("--json", action="store_true", help="print the full group plan as JSON")
    p.set_defaults(func=_inspect)

    from gisp_fx.cli_compile import add_compile_commands

    add_compile_commands(sub)
    from gisp_fx.cli_export import add_export_commands

    add_export_commands(sub)
    from gisp_fx.cli_recover import add_recover_command

    add_recover_command(sub)
    return parser


INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:
        print("gisp-fx: interrupted", file=sys.stderr)
        return INTERRUPTED
    try:
        args.func(args)
    except GispError as exc:
        print(f"gisp-fx {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # one line, no traceback: what was kept and how to go on
        hint = "; ".join(getattr(exc, "__notes__", [])) or "nothing was written"
        exc.__traceback__ = None  # frees the frames now: their progress bars close before the line, not after it
        gc.collect()
        print(f"\ngisp-fx {args.command}: interrupted; {hint}", file=sys.stderr)
        return INTERRUPTED
    except OSError as exc:  # a disk that fills or a file that vanishes mid-command: one line, not a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"gisp-fx {args.command}: error: {exc.strerror or exc}{where}; outputs are staged and renamed at the "
              "end, so nothing half-written was left: free the space or fix the path and run it again",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
