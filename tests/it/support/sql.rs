//! Straight to PostgreSQL: logging in as a leased credential, and one
//! value or one column of a query.

use super::*;

/// Logs in as a leased credential; returns the error text on refusal.
pub async fn login(db: &str, user: &str, password: &str) -> Result<tokio_postgres::Client, String> {
    let mut cfg = cluster().config(db);
    cfg.user(user)
        .password(password)
        .connect_timeout(Duration::from_secs(5));
    match cfg.connect(tokio_postgres::NoTls).await {
        Ok((client, conn)) => {
            tokio::spawn(conn);
            Ok(client)
        }
        Err(e) => Err(e
            .as_db_error()
            .map(|d| d.message().to_string())
            .unwrap_or_else(|| e.to_string())),
    }
}

/// Live (not revoked) rows in a PostgreSQL lease store.
pub async fn live_lease_rows(store: &tokio_postgres::Client) -> i64 {
    one_value(
        store,
        "SELECT count(*) FROM credbroker_leases WHERE state <> 'revoked'",
        &[],
    )
    .await
}

/// Roles named like the password probe's (`credbroker_check_…`, made by
/// `check` and preflight) still on `pg`: 0 once every probe cleaned up.
pub async fn probe_roles_left(pg: &ThrowawayPostgres, db: &str) -> i64 {
    let c = pg.connect(db).await.unwrap();
    one_value(
        &c,
        "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'credbroker\\_check\\_%'",
        &[],
    )
    .await
}

/// The one value `sql` returns on `c` with `params`: a count, a name.
pub async fn one_value<T>(
    c: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> T
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    c.query_one(sql, params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

/// The first column of the rows `sql` returns on `c` with `params`.
pub async fn column<T, C>(
    c: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> C
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
    C: FromIterator<T>,
{
    c.query(sql, params)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}
