"""`posttrain feedback <subcommand>`: serve the app, add annotators, make projects, export.

Every subcommand takes `--db URL` (default sqlite:///feedback.db; PostgreSQL by URL, e.g.
postgresql+psycopg://user@host/db) and upgrades that database's schema first. Whoever can run
these commands on the database is an admin: there is no token to give.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

DEFAULT_DB = "sqlite:///feedback.db"

EPILOG = """examples:
  posttrain feedback admin-token                      # prints an admin's login token, once
  posttrain feedback add-annotator alice              # prints alice's token, once
  posttrain feedback create-project demo --samples samples.jsonl --labels-per-item 3
  posttrain feedback create-project sampled --model runs/sft/final --prompts prompts.jsonl --k 4
  posttrain feedback serve                            # http://127.0.0.1:8765/
  posttrain feedback stats demo
  posttrain feedback export demo --out runs/feedback  # rankings.jsonl, pairs.jsonl
  posttrain rm model.path=runs/sft/final data.train=runs/feedback/rankings.jsonl
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="posttrain feedback",
        description="The human-feedback app: annotators rank model responses in a browser; "
        "the labels export as the files `posttrain rm` and `posttrain dpo` read.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="subcommand", required=True)

    def command(name: str, about: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=about, description=about)
        sub.add_argument("--db", default=DEFAULT_DB, help=f"database URL (default {DEFAULT_DB})")
        return sub

    serve = command("serve", "serve the annotation and admin pages and their API")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free)")

    add = command("add-annotator", "create an annotator and print their login token (once)")
    add.add_argument("name", help="1 to 64 letters, digits or _ . @ -")
    add.add_argument("--admin", action="store_true", help="may also create projects and export")

    admin = command("admin-token", "create an admin and print their login token (once)")
    admin.add_argument("--name", default="admin", help="the admin's name (default admin)")

    revoke = command("revoke", "stop an annotator's token and end their sessions")
    revoke.add_argument("name")

    create = command(
        "create-project",
        "make a project from a samples file, or by sampling a model's responses to prompts",
    )
    create.add_argument("name", help="the project's name")
    source = create.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples", help="JSONL/JSON/Parquet rows {prompt, responses: [...], id?}")
    source.add_argument("--model", help="a model directory to sample responses from")
    create.add_argument("--prompts", help="with --model: rows {prompt, id?} to sample for")
    create.add_argument("--k", type=int, default=4, help="with --model: responses per prompt")
    create.add_argument("--limit", type=int, default=0, help="with --model: first N prompts")
    create.add_argument("--max-new-tokens", type=int, default=128, help="with --model")
    create.add_argument("--temperature", type=float, default=1.0, help="with --model")
    create.add_argument("--seed", type=int, default=0, help="with --model: the sampler's seed")
    create.add_argument("--device", default="auto", help="with --model: cpu, cuda, auto")
    create.add_argument(
        "--mode",
        choices=("rank", "pair"),
        default="rank",
        help="rank all K responses, or A / B / tie for K = 2 (default rank)",
    )
    create.add_argument(
        "--labels-per-item", type=int, default=3, help="N annotators per item (default 3)"
    )
    create.add_argument(
        "--lease-seconds",
        type=float,
        default=600.0,
        help="how long an offered item is held for its annotator (default 600)",
    )
    create.add_argument(
        "--no-shuffle",
        dest="shuffle",
        action="store_false",
        help="show responses in file order (default: each annotator sees their own order)",
    )

    export = command("export", "write PROJECT's labels as rankings.jsonl and pairs.jsonl")
    export.add_argument("project", help="project name (or id)")
    export.add_argument("--out", required=True, help="output directory")

    stats = command("stats", "print counts and agreement (Krippendorff's alpha) as JSON")
    stats.add_argument("project", nargs="?", help="project name or id (default: all)")
    return parser


def main(argv: list[str]) -> int:
    """Run one subcommand; 0 on success, 2 on bad input (with the reason on stderr)."""
    args = _parser().parse_args(argv)
    from posttrain.data.records import DataError

    try:
        return _run(args)
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        from posttrain.feedback.app import serve

        serve(args.db, host=args.host, port=args.port)
        return 0

    from posttrain.feedback import auth
    from posttrain.feedback.db import open_database

    with open_database(args.db)() as db:
        if args.command in ("add-annotator", "admin-token"):
            is_admin = args.command == "admin-token" or args.admin
            annotator, token = auth.create_annotator(db, args.name, admin=is_admin)
            db.commit()
            role = "admin" if is_admin else "annotator"
            print(f"{role} {annotator.name}: token (shown only now, keep it secret):")
            print(token)
            return 0
        if args.command == "revoke":
            auth.revoke(db, args.name)
            db.commit()
            print(f"revoked {args.name}")
            return 0
        if args.command == "create-project":
            return _create_project(db, args)
        if args.command == "export":
            from posttrain.feedback.export import write_export
            from posttrain.feedback.projects import find_project

            print(json.dumps(write_export(db, find_project(db, args.project), args.out), indent=2))
            return 0
        return _stats(db, args.project)


def _create_project(db: Any, args: argparse.Namespace) -> int:
    from posttrain.feedback.projects import (
        create_project,
        parse_samples,
        project_summary,
        read_samples,
    )

    skipped = 0
    if args.samples:
        records, source = read_samples(args.samples), args.samples
    else:
        if not args.prompts:
            raise ValueError("--model needs --prompts, a file of rows {prompt, id?}")
        if args.mode == "pair" and args.k != 2:
            raise ValueError(f"--mode pair compares 2 responses; got --k {args.k}")
        from posttrain.feedback.sampling import sample_rows

        rows, skipped = sample_rows(
            args.model,
            args.prompts,
            k=args.k,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            limit=args.limit,
            seed=args.seed,
            device=args.device,
        )
        source = f"responses of {args.model} to {args.prompts}"
        records = parse_samples(rows, source)
    project = create_project(
        db,
        args.name,
        records,
        mode=args.mode,
        labels_per_item=args.labels_per_item,
        lease_seconds=args.lease_seconds,
        shuffle=args.shuffle,
        source=source,
    )
    db.commit()
    summary = project_summary(db, project)
    if skipped:
        summary["prompts_skipped"] = skipped  # fewer than two distinct responses sampled
    print(json.dumps(summary, indent=2))
    return 0


def _stats(db: Any, name: str | None) -> int:
    from sqlalchemy import select

    from posttrain.feedback.db import Project
    from posttrain.feedback.export import project_agreement
    from posttrain.feedback.projects import find_project, project_summary

    projects = (
        [find_project(db, name)] if name else db.scalars(select(Project).order_by(Project.id))
    )
    report = [{**project_summary(db, p), "agreement": project_agreement(db, p)} for p in projects]
    print(json.dumps(report[0] if name else report, indent=2))
    return 0
