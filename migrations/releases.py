"""The definitions of ``sql/`` as each revision released them, stored once, and the checksums
that keep released revisions frozen.

A downgrade puts back the functions, views and grants of the revision it returns to: its
hand-written reversal (``NNNN_name_down.sql``) says where with a line ``--@definitions NNNN``,
and those definitions come from ``released_definitions.tar.xz``, one folder per revision
(``0011/40_queue.sql``...). Files that differ little from one release to the next compress
together: the whole history takes tens of kilobytes.

A new revision is frozen when it is added: ``sql/`` as it stands becomes its definitions, and the
checksums of its files are recorded. Until the next revision comes, every change to ``sql/`` is
stored again (a test says so when it is not)::

    python -m imgembed.migrations.releases freeze 0013
    python -m imgembed.migrations.releases freeze 0013 --replace

``python -m imgembed.migrations.releases check`` says whether anything released has changed since.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import sys
import tarfile
from importlib.resources import files
from pathlib import Path

ARCHIVE_NAME = "released_definitions.tar.xz"
CHECKSUMS_NAME = "SHA256SUMS"


def _archive_bytes() -> bytes:
    return (files("imgembed.migrations") / ARCHIVE_NAME).read_bytes()


def _members(archive: bytes) -> dict[str, str]:
    """Every file of the archive by its path (``0011/40_queue.sql``)."""
    found: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:xz") as tar:
        for member in tar.getmembers():
            if member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None
                found[member.name] = extracted.read().decode("utf-8")
    return found


def released_definitions(revision: str) -> list[tuple[str, str]]:
    """The definition files of ``sql/`` as ``revision`` released them, in the order they apply."""
    prefix = f"{revision}/"
    released = sorted((path[len(prefix):], text) for path, text in _members(_archive_bytes()).items()
                      if path.startswith(prefix))
    if not released:
        raise LookupError(f"no definitions were released with revision {revision} ({ARCHIVE_NAME})")
    return released


def _write_archive(members: dict[str, str]) -> bytes:
    """The archive of these files, the same bytes for the same files (sorted, no times or owners)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:  # type: ignore[call-overload]
        for path in sorted(members):
            data = members[path].encode("utf-8")
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def checksums(migrations: Path) -> dict[str, str]:
    """sha256 of every revision file in ``migrations/versions`` and of every released definition."""
    sums = {f"versions/{path.name}": hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted((migrations / "versions").iterdir()) if path.name[:4].isdigit()}
    for path, text in _members((migrations / ARCHIVE_NAME).read_bytes()).items():
        sums[f"{ARCHIVE_NAME}/{path}"] = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return dict(sorted(sums.items()))


def read_checksums(migrations: Path) -> dict[str, str]:
    lines = (migrations / "versions" / CHECKSUMS_NAME).read_text(encoding="utf-8").splitlines()
    return {name: digest for digest, name in (line.split("  ", 1) for line in lines if line.strip())}


def changed(migrations: Path) -> list[str]:
    """What differs from the recorded checksums: released files changed or gone, files not recorded."""
    recorded, found = read_checksums(migrations), checksums(migrations)
    return sorted({name for name in recorded.keys() | found.keys() if recorded.get(name) != found.get(name)})


def _write_checksums(migrations: Path, recorded: dict[str, str]) -> None:
    (migrations / "versions" / CHECKSUMS_NAME).write_text(
        "".join(f"{digest}  {name}\n" for name, digest in sorted(recorded.items())), encoding="utf-8")


def freeze(migrations: Path, sql: Path, revision: str, *, replace: bool = False) -> list[str]:
    """Add ``sql/`` as it stands as ``revision``'s definitions, and record the checksums of what is
    new. Files already recorded must not have changed; ``replace`` stores the newest revision's
    definitions again (``sql/`` changed since). Returns the names recorded."""
    recorded, found = read_checksums(migrations), checksums(migrations)
    drifted = [name for name, digest in recorded.items() if found.get(name) != digest]
    if drifted:
        raise SystemExit(f"released files changed since they were recorded: {', '.join(drifted)}")
    members = _members((migrations / ARCHIVE_NAME).read_bytes())
    prefix = f"{revision}/"
    if replace:
        newest = max(path.name[:4] for path in (migrations / "versions").iterdir() if path.name[:4].isdigit())
        if revision != newest:
            raise SystemExit(f"only the newest revision's definitions may be stored again ({newest}, not {revision})")
        members = {path: text for path, text in members.items() if not path.startswith(prefix)}
        recorded = {name: digest for name, digest in recorded.items() if not name.startswith(f"{ARCHIVE_NAME}/{prefix}")}
    elif any(path.startswith(prefix) for path in members):
        raise SystemExit(f"revision {revision}'s definitions are released already")
    for path in sorted(sql.glob("*.sql")):
        members[f"{prefix}{path.name}"] = path.read_text(encoding="utf-8")
    (migrations / ARCHIVE_NAME).write_bytes(_write_archive(members))
    found = checksums(migrations)
    added = sorted(name for name in found if name not in recorded)
    _write_checksums(migrations, recorded | {name: found[name] for name in added})
    return added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgembed.migrations.releases",
                                     description="Freeze a released revision, or check that none changed.")
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the source tree holding migrations/ and sql/ (default: this checkout)")
    commands = parser.add_subparsers(dest="command", required=True)
    frozen = commands.add_parser("freeze", help="store sql/ as REVISION's definitions and record checksums")
    frozen.add_argument("revision", help="the revision being released, e.g. 0013")
    frozen.add_argument("--replace", action="store_true",
                        help="store the newest revision's definitions again, after a change to sql/")
    commands.add_parser("check", help="list released files that changed (exit 1 if any)")
    args = parser.parse_args(argv)
    migrations, sql = args.source / "migrations", args.source / "sql"
    if args.command == "freeze":
        for name in freeze(migrations, sql, args.revision, replace=args.replace):
            print("recorded", name)
        return 0
    drift = changed(migrations)
    for name in drift:
        print("changed:", name)
    return 1 if drift else 0


if __name__ == "__main__":
    sys.exit(main())
