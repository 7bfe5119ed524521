"""``lora-da conformance check|export`` and ``python -m lora_da.conformance``.

Kept apart from the checker so that building the CLI's parser imports nothing
heavy (numpy, torch and the cases load when a subcommand runs)."""

from __future__ import annotations

import argparse
import sys

PROG = "lora-da conformance"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="conformance_command", metavar="check|export")
    sub.required = True
    c = sub.add_parser("check", help="check RESULTS against the exact answers (SPEC §5); exit 1 on failure")
    c.add_argument("results", metavar="RESULTS",
                   help="a safetensors file of '<case>/<module>/A' and '/B', or a PEFT adapter directory (with --statistics)")
    c.add_argument("--inputs", default=None, metavar="DIR",
                   help="the cases' inputs from 'conformance export' (default: regenerate them from the recipes)")
    c.add_argument("--statistics", default=None, metavar="STATS",
                   help="with a PEFT adapter directory: the statistics file it was computed from")
    c.add_argument("--n-pop", type=float, default=None, help="with --statistics: N_pop the adapter used")
    from lora_da._core import SOLVE_DEFAULTS

    c.add_argument("--gamma", type=float, default=SOLVE_DEFAULTS["gamma"], help="with --statistics (default %(default)g)")
    c.add_argument("--alpha", type=float, default=SOLVE_DEFAULTS["alpha"], help="with --statistics")
    c.add_argument("--beta", type=float, default=SOLVE_DEFAULTS["beta"], help="with --statistics")
    c.add_argument("--damping", type=float, default=SOLVE_DEFAULTS["damping"], help="with --statistics")
    c.add_argument("--no-normalize", action="store_true", help="with --statistics")
    c.add_argument("--output-fisher", choices=["diagonal", "sequence_lowrank"], default="diagonal",
                   help="with --statistics")
    c.set_defaults(conformance_func=cmd_check)
    e = sub.add_parser("export", help="write the cases' inputs (safetensors + manifest.json) to DIR")
    e.add_argument("dir", metavar="DIR")
    e.add_argument("--overwrite", action="store_true")
    e.set_defaults(conformance_func=cmd_export)


def add_subcommand(sub) -> None:
    """``lora-da conformance`` in the main CLI (lora_da.cli)."""
    p = sub.add_parser("conformance", help="check another LoRA-DA implementation against the exact answers")
    add_arguments(p)
    p.set_defaults(func=lambda args: args.conformance_func(args))


def cmd_export(args) -> int:
    from lora_da.conformance.cases import regenerate
    from lora_da.conformance.export import export

    out = export(args.dir, regenerate(), overwrite=args.overwrite)
    print(f"conformance: wrote {out}/manifest.json and the cases' inputs")
    return 0


def cmd_check(args) -> int:
    from pathlib import Path

    from lora_da.conformance import checker
    from lora_da.errors import InvalidArgumentError

    path = Path(args.results)
    if path.is_dir():
        if args.statistics is None or args.n_pop is None:
            raise InvalidArgumentError(f"{PROG} check: {path} is a directory (a PEFT adapter): pass --statistics "
                                       "and --n-pop (and the options the adapter was solved with)")
        report = checker.check_adapter(path, args.statistics, n_pop=args.n_pop, gamma=args.gamma, alpha=args.alpha,
                                       beta=args.beta, damping=args.damping, normalize=not args.no_normalize,
                                       output_fisher=args.output_fisher)
    else:
        inputs = None
        if args.inputs is not None:
            from lora_da.conformance.export import read_exported

            inputs = read_exported(args.inputs)
        results, units = checker.read_results(path)
        report = checker.check_results(results, inputs, units=units)
    print(report.format())
    return 0 if report.ok else 1


def main(argv=None) -> int:
    from lora_da.errors import CLIError
    from lora_da.errors import LoraDAError

    p = argparse.ArgumentParser(prog="python -m lora_da.conformance", description="LoRA-DA conformance kit (SPEC §5)")
    add_arguments(p)
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    try:
        return int(args.conformance_func(args) or 0)
    except (LoraDAError, CLIError, ValueError, OSError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
