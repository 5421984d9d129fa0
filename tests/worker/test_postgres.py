"""The throw-away PostgreSQL server the test control plane can run on (``OUTPOST_TEST_DB=postgres``)."""

from __future__ import annotations

import pytest

from airflow_outpost.worker.testing.postgres import PostgresError, PostgresServer, metadata_db, server_bindir

try:
    server_bindir()
    HAVE_POSTGRES = True
except PostgresError:
    HAVE_POSTGRES = False


def test_the_database_is_chosen_by_the_environment_and_sqlite_stays_the_default() -> None:
    assert metadata_db({}) == "sqlite"
    assert metadata_db({"OUTPOST_TEST_DB": "Postgres "}) == "postgres"
    with pytest.raises(PostgresError, match="OUTPOST_TEST_DB='mysql'"):
        metadata_db({"OUTPOST_TEST_DB": "mysql"})


@pytest.mark.postgres
@pytest.mark.skipif(not HAVE_POSTGRES, reason="needs Debian's postgresql (apt-get install -y postgresql)")
def test_a_server_starts_serves_airflows_driver_and_leaves_nothing_behind() -> None:
    psycopg2 = pytest.importorskip("psycopg2")
    server = PostgresServer()
    server.stop()  # safe before start
    url = server.start()
    root = server.folder
    try:
        assert url == f"postgresql+psycopg2://postgres@127.0.0.1:{server.port}/airflow"
        with psycopg2.connect(host="127.0.0.1", port=server.port, user="postgres", dbname="airflow") as conn:
            cur = conn.cursor()
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        server.stop()
        server.stop()  # safe twice
    assert root is not None and not root.exists()
