"""Texts and query images are each role's own requests: a role learns about its own only, keeps to
its own limits (one role's flood never stops another's queries), forgets its own, and requests
expire. No sequence of imgembed's may be advanced by a reader."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest

from imgembed.training.synthetic import random_shapes
from tests.conftest import TEST_MODEL, as_role


@pytest.fixture
def tenants(db: psycopg.Connection, database_url: str) -> Iterator[tuple[psycopg.Connection, psycopg.Connection]]:
    """Two readers, alice and bob, each on its own connection (no worker runs: requests wait)."""
    suffix = uuid.uuid4().hex[:8]
    names = [f"alice_{suffix}", f"bob_{suffix}"]
    for name in names:
        db.execute(f"CREATE ROLE {name} LOGIN IN ROLE imgembed_reader")
    connections = [psycopg.connect(as_role(database_url, name), autocommit=True) for name in names]
    yield connections[0], connections[1]
    for connection in connections:
        connection.close()
    for name in names:
        db.execute(f"DROP OWNED BY {name}")
        db.execute(f"DROP ROLE {name}")


def _limit(db: psycopg.Connection, name: str, value: str) -> None:
    db.execute("INSERT INTO imgembed.private_setting (name, value) VALUES (%s, %s) "
               "ON CONFLICT (name) DO UPDATE SET value = excluded.value", (name, value))


def test_each_role_has_its_own_requests_and_limits(
    db: psycopg.Connection, tenants: tuple[psycopg.Connection, psycopg.Connection],
) -> None:
    alice, bob = tenants
    alice_name, bob_name = (connection.info.user for connection in tenants)
    _limit(db, "queries_waiting_per_role", "3")
    for number in range(3):
        alice.execute("SELECT imgembed.request_text(%s)", (f"alice's text {number}",))
    with pytest.raises(psycopg.errors.TooManyConnections, match=f"role {alice_name} has 3 texts waiting"):
        alice.execute("SELECT imgembed.request_text('one text too many')")
    bob.execute("SELECT imgembed.request_text('bob asks all the same')")  # alice's flood stops only alice
    alice.execute("SELECT imgembed.request_text(%s)", ("alice's text 1",))  # asked before: still answers

    # A role learns about its own requests only, and may ask only as itself.
    (alice_asked,) = alice.execute("SELECT (imgembed._text_state('alice''s text 0', %s, %s)).requested",
                                   (TEST_MODEL, alice_name)).fetchone()
    (bob_asked,) = bob.execute("SELECT (imgembed._text_state('alice''s text 0', %s, %s)).requested",
                               (TEST_MODEL, bob_name)).fetchone()
    assert (alice_asked, bob_asked) == (True, False)
    for spoofed in ("SELECT imgembed._text_state('alice''s text 0', %s, %s)",
                    "SELECT imgembed._request_text_elsewhere(%s, %s)"):
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="may not make requests as role"):
            bob.execute(spoofed, (TEST_MODEL, alice_name) if "state" in spoofed else ("x", alice_name))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        bob.execute("SELECT * FROM imgembed.query_request")

    # The same text asked by both is one row; each forgets its own, and the text goes with the last.
    bob.execute("SELECT imgembed.request_text(%s)", ("alice's text 2",))
    assert db.execute("SELECT count(*) FROM imgembed.text_query WHERE query = 'alice''s text 2'").fetchone()[0] == 1
    assert alice.execute("SELECT imgembed.forget_queries()").fetchone()[0] == 3
    assert {row[0] for row in db.execute("SELECT query FROM imgembed.text_query")} == {
        "bob asks all the same", "alice's text 2"}
    assert bob.execute("SELECT imgembed.forget_queries()").fetchone()[0] == 2
    assert db.execute("SELECT count(*) FROM imgembed.text_query").fetchone()[0] == 0


def test_query_images_are_kept_within_each_roles_limits_and_expire(
    db: psycopg.Connection, tenants: tuple[psycopg.Connection, psycopg.Connection],
) -> None:
    alice, bob = tenants
    alice_name = alice.info.user
    images = [shape.png_bytes() for shape in random_shapes(4, seed=21)]
    _limit(db, "query_images_per_role", "2")
    for image in images[:2]:
        alice.execute("SELECT imgembed.request_image(%s)", (image,))
    with pytest.raises(psycopg.errors.DiskFull, match=f"role {alice_name} keeps 2 query images") as refused:
        alice.execute("SELECT imgembed.request_image(%s)", (images[2],))
    assert "forget_queries" in (refused.value.diag.message_hint or "")
    bob.execute("SELECT imgembed.request_image(%s)", (images[2],))
    _limit(db, "query_images_per_role", "100")
    _limit(db, "query_image_bytes_per_role", str(len(images[0]) + len(images[1]) + len(images[3]) - 1))
    with pytest.raises(psycopg.errors.DiskFull, match="bytes"):
        alice.execute("SELECT imgembed.request_image(%s)", (images[3],))
    # Another role's image is no answer to alice: she learns nothing of it.
    (state,) = alice.execute("SELECT (imgembed._image_state(sha256(%s), NULL, %s, %s)).query_id",
                             (images[2], TEST_MODEL, alice_name)).fetchone()
    assert state is None

    # Requests not made again within the window expire; images nobody asks for go with them.
    db.execute("UPDATE imgembed.query_request SET requested_at = now() - interval '8 days' "
               "WHERE role_name = %s", (alice_name,))
    assert db.execute("SELECT imgembed.expire_queries()").fetchone()[0] == 0  # made just now: kept by created_at
    db.execute("UPDATE imgembed.image_query SET created_at = now() - interval '8 days'")
    assert db.execute("SELECT imgembed.expire_queries()").fetchone()[0] == 2  # alice's; bob's stays
    assert db.execute("SELECT count(*) FROM imgembed.image_query").fetchone()[0] == 1


def test_no_reader_may_advance_a_sequence(db: psycopg.Connection) -> None:
    granted = db.execute(
        "SELECT c.oid::regclass::text FROM pg_class c WHERE c.relnamespace = 'imgembed'::regnamespace AND c.relkind = 'S' "
        "AND (has_sequence_privilege('imgembed_reader', c.oid, 'USAGE') "
        "     OR has_sequence_privilege('imgembed_reader', c.oid, 'UPDATE'))").fetchall()
    assert granted == []


def test_a_query_image_is_at_most_32_mb(db: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.StringDataRightTruncation, match="at most 32 MB"):
        db.execute("SELECT imgembed.request_image(%s)", (b"\0" * (32 * 1024 * 1024 + 1),))
    assert db.execute("SELECT count(*) FROM imgembed.image_query").fetchone()[0] == 0
