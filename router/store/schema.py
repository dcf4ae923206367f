"""Versioned schema migrations shipped as numbered SQL files, shared by every store.

`load_migrations(package, dialect)` reads `<package>/migrations/<dialect>/NNNN_name.sql` in order and
refuses gaps, so a release can never skip or reorder a step.
"""

from __future__ import annotations

from importlib import resources
from typing import NamedTuple


class Migration(NamedTuple):
    version: int
    name: str
    sql: str


def load_migrations(package: str, dialect: str) -> list[Migration]:
    """The packaged migrations, in order. Numbers must run 1..N without gaps."""
    folder = resources.files(package) / "migrations" / dialect
    found = sorted(
        (int(f.name.split("_", 1)[0]), f.name, f.read_text(encoding="utf-8"))
        for f in folder.iterdir()
        if f.name.endswith(".sql")
    )
    migrations = [Migration(*m) for m in found]
    if [m.version for m in migrations] != list(range(1, len(migrations) + 1)):
        raise RuntimeError(f"{package} {dialect} migrations are not numbered 1..N: {[m.name for m in migrations]}")
    return migrations
