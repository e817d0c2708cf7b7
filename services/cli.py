"""``kaiku``: the command line of kaiku.

kaiku run                 the embedded default: broker, SQLite, the three services, one port
kaiku check PROGRAM       validate a survey program; every error with its line and column
kaiku schemas [--check]   export schemas/ from the message models (or check they agree)
kaiku simulate PROGRAM EVENTS.jsonl [--format json]
                          the trigger's decisions over an event log, with no side effects
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _check(args: argparse.Namespace) -> int:
    from services.common.program import ProgramError, load_program

    status = 0
    for path in args.program:
        try:
            program = load_program(path)
        except ProgramError as exc:
            for line in exc.errors:
                print(line, file=sys.stderr)
            status = 1
            continue
        print(f"{path}: ok ({len(program.surveys)} surveys, {len(program.triggers)} triggers)")
    return status


def _schemas(args: argparse.Namespace) -> int:
    from services.common.schemas import check, export

    if args.check:
        drift = check(Path(args.dir))
        for line in drift:
            print(line, file=sys.stderr)
        return 1 if drift else 0
    for path in export(Path(args.dir)):
        print(f"wrote {path}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from pydantic import TypeAdapter

    from services.common.program import Duration, ProgramError, load_program
    from services.trigger.simulate import render, simulate, to_json

    logging.basicConfig(level=logging.WARNING)
    try:
        program = load_program(args.program)
    except ProgramError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    if not args.events.exists():
        print(f"{args.events}: no such file", file=sys.stderr)
        return 1
    window = TypeAdapter(Duration).validate_python(args.window)
    span = TypeAdapter(Duration).validate_python(args.span)
    report = asyncio.run(
        simulate(program, args.events, batch_size=args.batch, window=window, span=span)
    )
    print(to_json(report) if args.format == "json" else render(report))
    return 0


def _run(_args: argparse.Namespace) -> int:
    import asyncio

    from services.embedded import run

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="kaiku", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate survey programs")
    check.add_argument("program", nargs="+", type=Path)
    check.set_defaults(func=_check)
    schemas = sub.add_parser("schemas", help="export or check the JSON Schemas in schemas/")
    schemas.add_argument("--dir", default="schemas")
    schemas.add_argument("--check", action="store_true")
    schemas.set_defaults(func=_schemas)
    sim = sub.add_parser("simulate", help="replay an event log through the trigger's decisions")
    sim.add_argument("program", type=Path)
    sim.add_argument("events", type=Path, help="CloudEvents, one JSON per line (.jsonl or .gz)")
    sim.add_argument("--format", choices=["text", "json"], default="text")
    sim.add_argument("--window", default="30d", help="window of the per-customer distribution")
    sim.add_argument("--batch", type=int, default=200, help="events per simulated batch")
    sim.add_argument(
        "--span",
        default="10m",
        help="longest stretch of event time one simulated batch covers (its clock "
        "is its last event's time): shorter is more exact, longer is faster",
    )
    sim.set_defaults(func=_simulate)
    run = sub.add_parser("run", help="run everything on one machine (the embedded default)")
    run.set_defaults(func=_run)
    args = parser.parse_args(argv)
    try:
        sys.exit(args.func(args))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
