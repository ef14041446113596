//! Access requests in SQLite: indexed columns for what is asked of them
//! (state, requester, when due), the rest a JSON body; every change a
//! compare-and-set on `version`.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{params, OptionalExtension};

use super::{ms, SqliteStore};
use crate::error::Result;
use crate::store::access::{states_sql, MAX_ACCESS_LIST};
use crate::store::{AccessFilter, AccessRequest, AccessStore};

fn rows_to_requests(rows: Vec<(String, i64)>) -> Result<Vec<AccessRequest>> {
    rows.iter()
        .map(|(body, version)| AccessRequest::from_body(body, *version))
        .collect()
}

/// (body, version) of each row `sql` selects.
fn bodies(
    c: &rusqlite::Connection,
    sql: &str,
    args: impl rusqlite::Params,
) -> rusqlite::Result<Vec<(String, i64)>> {
    let mut stmt = c.prepare(sql)?;
    let rows = stmt.query_map(args, |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

#[async_trait]
impl AccessStore for SqliteStore {
    async fn insert_access(&self, r: &AccessRequest) -> Result<()> {
        let body = r.to_body()?;
        let r = r.clone();
        self.with(move |c| {
            c.execute(
                "INSERT INTO access_requests (id, state, requester, created_at, due_at, version, body) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![
                    r.id,
                    r.state.as_str(),
                    r.requester,
                    ms(r.created_at),
                    r.due_at().map(ms),
                    r.version,
                    body
                ],
            )
            .map(|_| ())
        })
        .await
    }

    async fn get_access(&self, id: &str) -> Result<Option<AccessRequest>> {
        let id = id.to_string();
        let row = self
            .with_read(move |c| {
                c.query_row(
                    "SELECT body, version FROM access_requests WHERE id = ?1",
                    params![id],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)),
                )
                .optional()
            })
            .await?;
        row.map(|(b, v)| AccessRequest::from_body(&b, v))
            .transpose()
    }

    async fn update_access(&self, r: &AccessRequest) -> Result<bool> {
        let mut next = r.clone();
        next.version = r.version + 1;
        let body = next.to_body()?;
        let n = self
            .with(move |c| {
                c.execute(
                    "UPDATE access_requests SET state = ?2, due_at = ?3, version = ?4, body = ?5 \
                     WHERE id = ?1 AND version = ?6",
                    params![
                        next.id,
                        next.state.as_str(),
                        next.due_at().map(ms),
                        next.version,
                        body,
                        next.version - 1
                    ],
                )
            })
            .await?;
        Ok(n == 1)
    }

    async fn list_access(&self, filter: &AccessFilter) -> Result<Vec<AccessRequest>> {
        let mut sql = String::from("SELECT body, version FROM access_requests WHERE 1 = 1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        if let Some(q) = &filter.requester {
            args.push(q.clone().into());
            sql.push_str(&format!(" AND requester = ?{}", args.len()));
        }
        if !filter.states.is_empty() {
            sql.push_str(&format!(" AND state IN ({})", states_sql(&filter.states)));
        }
        let limit = filter.limit.unwrap_or(MAX_ACCESS_LIST).min(MAX_ACCESS_LIST);
        sql.push_str(&format!(" ORDER BY created_at DESC, id DESC LIMIT {limit}"));
        let rows = self
            .with_read(move |c| bodies(c, &sql, rusqlite::params_from_iter(args)))
            .await?;
        rows_to_requests(rows)
    }

    async fn access_due(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<AccessRequest>> {
        let rows = self
            .with_read(move |c| {
                bodies(
                    c,
                    "SELECT body, version FROM access_requests \
                     WHERE due_at IS NOT NULL AND due_at <= ?1 ORDER BY due_at, id LIMIT ?2",
                    params![ms(now), limit as i64],
                )
            })
            .await?;
        rows_to_requests(rows)
    }
}
