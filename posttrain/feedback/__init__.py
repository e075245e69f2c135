"""The human-feedback app: `posttrain feedback serve|add-annotator|create-project|export|stats`.

Annotators rank a prompt's K responses (or pick A / B / tie) in a browser; each item is leased
to at most N annotators, none of them twice; the labels export as the `rankings.jsonl` and
`pairs.jsonl` files that `posttrain rm` and `posttrain dpo` read. docs/feedback.md has the data
model, the leasing rules, the security model and the agreement statistics.

| module | holds |
|---|---|
| `db.py` | the tables (SQLAlchemy), the engine (SQLite pragmas), schema upgrades (Alembic) |
| `auth.py` | login tokens (stored hashed), sessions, CSRF tokens |
| `projects.py` | projects made from sample rows, their validation |
| `sampling.py` | sample rows drawn from a model directory with the built-in sampler |
| `assign.py` | leases: which item an annotator gets next; submitting a label |
| `agreement.py` | Krippendorff's alpha and pairwise agreement, per project and per annotator |
| `export.py` | labels to `rankings.jsonl` and `pairs.jsonl` |
| `app.py` | the FastAPI app: pages, JSON API, security headers; `serve()` |
| `cli.py` | the `posttrain feedback` subcommands |
"""
