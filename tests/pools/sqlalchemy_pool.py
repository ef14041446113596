"""An application on a SQLAlchemy 2 pool, as an application team writes it:
the pool's `creator` re-reads the sidecar's file (--format json) whenever it
opens a connection, so a new connection always uses the newest credential.

Driven by tests/it/pools.rs:

    sqlalchemy_pool.py postgresql|mariadb FILE checked|defaults CONFIG_JSON

`checked` is what SQLAlchemy's docs advise ("Dealing with Disconnects"):
`pool_pre_ping=True`, and `pool_recycle` below the lease's lifetime.
`defaults` is the pool as it comes. The run and its report are common to
every pool client (see pool_run.py).
"""

import json
import sys

import sqlalchemy as sa

from pool_run import read_credential, run


def creator(kind, path):
    def connect():
        c = read_credential(path)
        common = {
            "host": c["host"],
            "port": c["port"],
            "user": c["username"],
            "password": c["password"],
            "connect_timeout": 5,
        }
        if kind == "postgresql":
            import psycopg

            tls = {k: c[k] for k in ("sslmode", "sslrootcert") if c.get(k)}
            return psycopg.connect(dbname=c["database"], **tls, **common)
        import pymysql

        return pymysql.connect(database=c["database"], **common)

    return connect


def main():
    kind, path, mode, config = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    url = "postgresql+psycopg://" if kind == "postgresql" else "mysql+pymysql://"
    settings = {"creator": creator(kind, path)}
    if mode == "checked":
        settings["pool_pre_ping"] = True
        settings["pool_recycle"] = config["max_lifetime_s"]
    engine = sa.create_engine(url, **settings)
    if kind == "postgresql":
        long_sql = "SELECT current_user::text, pg_sleep(:s)::text"
    else:
        long_sql = "SELECT SUBSTRING_INDEX(CURRENT_USER(), '@', 1), SLEEP(:s)"

    def query():
        with engine.connect() as conn:
            item = conn.execute(sa.text("SELECT item FROM orders WHERE id = 1")).scalar_one()
            if item != "coffee":
                raise RuntimeError(f"unexpected row {item!r}")

    def long_query():
        # Checks a connection out at once; runs the query when sent its
        # duration and gives the connection back as soon as it is done.
        with engine.connect() as conn:
            seconds = yield
            user = conn.execute(sa.text(long_sql), {"s": seconds}).one()[0]
        yield user

    report = run(path, config, query, long_query)
    engine.dispose()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
