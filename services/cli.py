"""``kaiku``: the command line of kaiku.

kaiku run                 the embedded default: broker, SQLite, the three services, one port
kaiku check PROGRAM       validate a survey program; every error with its line and column
kaiku schemas [--check]   export schemas/ from the message models (or check they agree)
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
    run = sub.add_parser("run", help="run everything on one machine (the embedded default)")
    run.set_defaults(func=_run)
    args = parser.parse_args(argv)
    try:
        sys.exit(args.func(args))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
