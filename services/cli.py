"""``kaiku``: the command line of kaiku.

kaiku run                 the embedded default: broker, SQLite, the three services, one port
kaiku check PROGRAM       validate a survey program; every error with its line and column, and
                          every message template its surveys use (an SMS over
                          KAIKU_SMS_MAX_SEGMENTS segments, a template that fails to render)
kaiku preview SURVEY --channel email|sms --locale fi|sv|en [--reminder] [--out PATH]
                          render a sample invitation of a survey to a file, to look at
kaiku schemas [--check]   export schemas/ from the message models (or check they agree)
kaiku simulate PROGRAM EVENTS.jsonl [--format json]
                          the trigger's decisions over an event log, with no side effects
kaiku topics create [--dry-run]
                          create the missing topics (partitions, replication, retention from
                          KAIKU_KAFKA_*); report the existing ones, never change them
kaiku dlq list [FILTERS] [--show-body] [--format json]
                          the dead letters: where from, which consumer, why (bodies masked)
kaiku dlq replay [FILTERS] [--dry-run] [--again] [--format json]
                          republish dead letters to their original topics, each at most once
                          FILTERS: --consumer C --source-topic T --reason-contains S
                                   --since 2h|2026-05-01T08:00Z --limit N
kaiku migrate [--service S] [--revision R | --downgrade R | --check | --new MESSAGE]
                          migrate the database schemas (the migration Job runs this)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# The survey token of `kaiku preview`: as long as a real one (services.common.tokens).
PREVIEW_TOKEN = "0PREVIEWsampletoken-notvalid0"  # noqa: S105 (a made-up survey token)


def _check(args: argparse.Namespace) -> int:
    from services.common.config import LinkSettings
    from services.common.program import ProgramError, load_program
    from services.dispatcher.config import DispatcherSettings
    from services.dispatcher.rendering import PLAUSIBLE_PUBLIC_URL, Renderer, check_templates

    dispatcher = DispatcherSettings()
    links = LinkSettings()
    # SMS segments are counted with the real public URL when it is configured, else with a
    # plausible production one (the local default is shorter than any real one).
    public_url = links.public_url if "public_url" in links.model_fields_set else None
    renderer = Renderer(public_url or PLAUSIBLE_PUBLIC_URL, dispatcher.template_dir)
    status = 0
    for path in args.program:
        try:
            program = load_program(path)
        except ProgramError as exc:
            for line in exc.errors:
                print(line, file=sys.stderr)
            status = 1
            continue
        problems = [
            f"{path}: {problem}"
            for survey in program.surveys
            for problem in check_templates(
                renderer, survey, max_segments=dispatcher.sms_max_segments
            )
        ]
        if problems:
            for line in problems:
                print(line, file=sys.stderr)
            status = 1
            continue
        print(f"{path}: ok ({len(program.surveys)} surveys, {len(program.triggers)} triggers)")
    return status


def _preview(args: argparse.Namespace) -> int:
    from jinja2 import TemplateError

    from services.common.config import LinkSettings, ProgramSettings
    from services.common.program import ProgramError, load_program
    from services.dispatcher.config import DispatcherSettings
    from services.dispatcher.rendering import Renderer, sample_invitation, template_error

    dispatcher = DispatcherSettings()
    program_path: Path = args.program or ProgramSettings().program
    try:
        program = load_program(program_path)
    except ProgramError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 1
    try:
        survey = program.survey(args.survey)
    except KeyError:
        known = ", ".join(s.id for s in program.surveys)
        print(f"{program_path}: no survey {args.survey!r} (there are: {known})", file=sys.stderr)
        return 1
    if args.channel not in survey.channels:
        print(
            f"note: survey {survey.id!r} does not list the {args.channel} channel",
            file=sys.stderr,
        )
    renderer = Renderer(LinkSettings().public_url, dispatcher.template_dir)
    invitation = sample_invitation(
        survey, channel=args.channel, locale=args.locale, token=PREVIEW_TOKEN
    )
    name = f"{survey.id}.{args.channel}.{args.locale}{'.reminder' if args.reminder else ''}"
    out: Path = args.out or Path("var/preview")
    if args.out is None or out.is_dir():
        out = out / f"{name}.{'html' if args.channel == 'email' else 'txt'}"
    elif args.channel == "email" and out.suffix == ".eml":
        out = out.with_suffix(".html")  # the .eml is written beside the HTML
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if args.channel == "email":
            email = renderer.outbound_email(
                invitation,
                survey,
                sender=dispatcher.email_from,
                unsubscribe_mailto=dispatcher.unsubscribe_mailto,
                domain=dispatcher.email_domain,
                reminder=args.reminder,
            )
            eml = out.with_suffix(".eml")
            out.write_text(email.html, encoding="utf-8")
            eml.write_bytes(email.message.as_bytes())
            print(out)
            print(eml)
            return 0
        sms = renderer.sms(invitation, survey, reminder=args.reminder)
    except (TemplateError, ValueError) as exc:
        print(
            f"survey {survey.id!r}, {args.channel}, {args.locale}: {template_error(exc)}",
            file=sys.stderr,
        )
        return 1
    limit = dispatcher.sms_max_segments
    out.write_text(
        f"{sms.text}\n\n{sms.encoding}, {sms.segments} segment{'s' * (sms.segments != 1)} "
        f"({len(sms.text)} characters; the limit is {limit} segments)\n",
        encoding="utf-8",
    )
    print(out)
    if sms.segments > limit:
        print(
            f"survey {survey.id!r}, sms, {sms.locale}: the SMS is {sms.segments} {sms.encoding} "
            f"segments, more than the limit of {limit} (KAIKU_SMS_MAX_SEGMENTS)",
            file=sys.stderr,
        )
        return 1
    return 0


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


def _sends(args: argparse.Namespace) -> int:
    """The dispatcher's sends: counts per status, or the list of those in doubt."""
    import asyncio
    import json

    from services.common.db import create_engine, create_sessionmaker
    from services.common.settings import CommonSettings
    from services.dispatcher import repository

    database = CommonSettings().with_database("dispatcher").database

    async def read() -> int:
        engine = create_engine(database)
        try:
            async with create_sessionmaker(engine)() as session:
                if args.what == "counts":
                    counts = await repository.counts(session)
                    if args.format == "json":
                        print(json.dumps(counts, sort_keys=True))
                    else:
                        for status, n in sorted(counts.items()):
                            print(f"{status:<10} {n}")
                    return 0
                rows = await repository.in_doubt(session, args.limit)
        finally:
            await engine.dispose()
        # No contact details: the ids are enough to look a send up, and this output gets pasted.
        listed = [
            {
                "invitation_id": str(s.invitation_id),
                "kind": s.kind,
                "customer_id": s.customer_id,
                "survey_id": s.survey_id,
                "channel": s.channel,
                "provider": s.provider,
                "claimed_by": s.claimed_by,
                "claimed_at": s.claimed_at.isoformat() if s.claimed_at else None,
                "marked_at": s.finished_at.isoformat() if s.finished_at else None,
            }
            for s in rows
        ]
        if args.format == "json":
            print(json.dumps(listed, indent=2))
        else:
            print(f"{len(listed)} send(s) in doubt (started, outcome unknown; never retried)")
            for r in listed:
                print(
                    f"{r['invitation_id']}  {r['kind']:<10} {r['channel']:<5} "
                    f"{r['survey_id']:<24} customer {r['customer_id']}  "
                    f"claimed by {r['claimed_by']} at {r['claimed_at']}"
                )
        return 0

    return asyncio.run(read())


def _run(_args: argparse.Namespace) -> int:
    import asyncio

    from services.embedded import run

    return asyncio.run(run())


def _migrate(args: argparse.Namespace) -> int:
    import asyncio

    from services.common import migrations
    from services.common.db import create_engine
    from services.common.settings import CommonSettings

    async def one(service: str) -> str:
        database = CommonSettings().with_database(service).database
        engine = create_engine(database)
        schema = database.schema_name
        try:
            if args.check:
                await migrations.ensure_current(engine, service, schema)
                return f"{service}: current ({migrations.head(service)})"
            if args.new:
                path = await migrations.new_revision(engine, service, args.new, schema)
                return f"{service}: wrote {path}"
            if args.downgrade:
                before, after = await migrations.downgrade(engine, service, schema, args.downgrade)
            else:
                before, after = await migrations.upgrade(engine, service, schema, args.revision)
        finally:
            await engine.dispose()
        if before == after:
            return f"{service}: at {after or 'base (no tables)'}, nothing to do"
        return f"{service}: {before or 'base (empty)'} -> {after or 'base (no tables)'}"

    status = 0
    for service in args.service or migrations.SERVICES:
        try:
            print(asyncio.run(one(service)), flush=True)
        except migrations.SchemaError as exc:
            print(f"{service}: {exc}", file=sys.stderr)
            status = 1
        except OSError as exc:
            print(f"{service}: the database is not reachable: {exc}", file=sys.stderr)
            status = 1
    return status


def _ops(args: argparse.Namespace) -> int:
    from services.ops import command

    return command(args)


def _since(value: str) -> object:
    """``--since``: an ISO 8601 time (UTC unless it says) or a duration back from now (2h, 7d)."""
    from datetime import UTC, datetime

    from pydantic import TypeAdapter, ValidationError

    from services.common.program import Duration

    try:
        at = datetime.fromisoformat(value)
        return at if at.tzinfo else at.replace(tzinfo=UTC)
    except ValueError:
        pass
    try:
        return datetime.now(UTC) - TypeAdapter(Duration).validate_python(value)
    except ValidationError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is neither a time (2026-05-01T08:00Z) nor a duration (2h, 7d)"
        ) from None


def _positive(value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number")
    return int(value)


def _add_ops_parsers(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``kaiku topics create`` and ``kaiku dlq list|replay`` (services/ops.py; read KAIKU_KAFKA_*).
    Exit codes: 0 done, 1 the broker is unreachable or refused, 2 a usage error."""
    topics = sub.add_parser("topics", help="the Kafka topics (KAIKU_KAFKA_*, KAIKU_TOPIC_PREFIX)")
    topics_sub = topics.add_subparsers(dest="topics_command", required=True)
    create = topics_sub.add_parser(
        "create",
        help="create the missing topics with KAIKU_KAFKA_PARTITIONS, _REPLICATION_FACTOR, "
        "_RETENTION_MS and _DLQ_RETENTION_MS; report the existing ones, never change them",
    )
    create.add_argument("--dry-run", action="store_true", help="print the plan, create nothing")
    create.set_defaults(func=_ops, ops="topics-create")
    dlq = sub.add_parser("dlq", help="the dead letters on <prefix>dlq: list and replay them")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True)
    filters = argparse.ArgumentParser(add_help=False)
    filters.add_argument("--consumer", help="only those of this consumer (trigger, ...)")
    filters.add_argument(
        "--source-topic", help="only those from this topic (with or without the prefix)"
    )
    filters.add_argument("--reason-contains", help="only those whose reason has this text")
    filters.add_argument(
        "--since", type=_since, help="only those since this time, or this long ago (2h, 7d)"
    )
    filters.add_argument("--limit", type=_positive, help="at most this many, oldest first")
    filters.add_argument("--format", choices=["text", "json"], default="text")
    listing = dlq_sub.add_parser(
        "list",
        parents=[filters],
        help="where each dead letter came from, which consumer refused it and why",
    )
    listing.add_argument(
        "--show-body",
        action="store_true",
        help="print the bodies too, with email addresses, phone numbers and secrets masked",
    )
    listing.set_defaults(func=_ops, ops="dlq-list")
    replay = dlq_sub.add_parser(
        "replay",
        parents=[filters],
        help="republish dead letters to their original topics (key, headers, bytes) with a "
        "kaiku-replayed-from header; each is marked and never replayed twice unless --again",
    )
    replay.add_argument("--dry-run", action="store_true", help="list them, produce nothing")
    replay.add_argument("--again", action="store_true", help="also those replayed before")
    replay.set_defaults(func=_ops, ops="dlq-replay")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="kaiku", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate survey programs")
    check.add_argument("program", nargs="+", type=Path)
    check.set_defaults(func=_check)
    preview = sub.add_parser(
        "preview", help="render a sample invitation of a survey to a file, to look at"
    )
    preview.add_argument("survey", help="the survey's id")
    preview.add_argument("--channel", choices=["email", "sms"], required=True)
    preview.add_argument("--locale", choices=["fi", "sv", "en"], required=True)
    preview.add_argument(
        "--program",
        type=Path,
        default=None,
        help="the survey program (default: KAIKU_PROGRAM, else deploy/local/program.yaml)",
    )
    preview.add_argument(
        "--out",
        type=Path,
        default=None,
        help="the file (or folder) to write: the HTML part of an email (with the whole message "
        "as .eml beside it), or an SMS's text; default: var/preview/",
    )
    preview.add_argument("--reminder", action="store_true", help="the reminder instead")
    preview.set_defaults(func=_preview)
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
    sends = sub.add_parser(
        "sends",
        help="the dispatcher's sends: counts per status, or the ones in doubt after a crash "
        "(reads KAIKU_DISPATCHER_DATABASE_URL, else KAIKU_DATABASE_URL)",
    )
    sends.add_argument("what", choices=["in-doubt", "counts"])
    sends.add_argument("--format", choices=["text", "json"], default="text")
    sends.add_argument("--limit", type=int, default=1000)
    sends.set_defaults(func=_sends)
    migrate = sub.add_parser(
        "migrate",
        help="migrate the services' database schemas (KAIKU_<SERVICE>_DATABASE_URL, else "
        "KAIKU_DATABASE_URL) to this release",
    )
    migrate.add_argument(
        "--service",
        action="append",
        choices=["trigger", "dispatcher", "collector"],
        help="only this service (repeatable; default: all three)",
    )
    mode = migrate.add_mutually_exclusive_group()
    mode.add_argument("--revision", default="head", help="migrate up to this revision")
    mode.add_argument("--downgrade", metavar="REVISION", help="migrate down to it (base: empty)")
    mode.add_argument("--check", action="store_true", help="exit 1 unless every schema is current")
    mode.add_argument(
        "--new", metavar="MESSAGE", help="developers: write a revision from the models' changes"
    )
    migrate.set_defaults(func=_migrate)
    _add_ops_parsers(sub)
    run = sub.add_parser("run", help="run everything on one machine (the embedded default)")
    run.set_defaults(func=_run)
    args = parser.parse_args(argv)
    try:
        sys.exit(args.func(args))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
