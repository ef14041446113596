//! Access requests in PostgreSQL, shared by every replica: indexed columns
//! for what is asked of them, the rest a JSON body; every change a
//! compare-and-set on `version`, so of two replicas deciding the same
//! request (an approval on one, the expiry on another) one write wins.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_postgres::types::ToSql;

use super::PostgresStore;
use crate::error::Result;
use crate::store::access::{states_sql, MAX_ACCESS_LIST};
use crate::store::{AccessFilter, AccessRequest, AccessStore};

fn rows_to_requests(rows: &[tokio_postgres::Row]) -> Result<Vec<AccessRequest>> {
    rows.iter()
        .map(|r| AccessRequest::from_body(&r.get::<_, String>(0), r.get(1)))
        .collect()
}

#[async_trait]
impl AccessStore for PostgresStore {
    async fn insert_access(&self, r: &AccessRequest) -> Result<()> {
        let body = r.to_body()?;
        self.execute(
            "insert access request",
            "INSERT INTO credbroker_access_requests \
             (id, state, requester, created_at, due_at, version, body) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
            &[
                &r.id,
                &r.state.as_str(),
                &r.requester,
                &r.created_at,
                &r.due_at(),
                &r.version,
                &body,
            ],
        )
        .await
        .map(|_| ())
    }

    async fn get_access(&self, id: &str) -> Result<Option<AccessRequest>> {
        let rows = self
            .query(
                "read access request",
                "SELECT body, version FROM credbroker_access_requests WHERE id = $1",
                &[&id],
            )
            .await?;
        Ok(rows_to_requests(&rows)?.into_iter().next())
    }

    async fn update_access(&self, r: &AccessRequest) -> Result<bool> {
        let mut next = r.clone();
        next.version = r.version + 1;
        let body = next.to_body()?;
        let n = self
            .execute(
                "update access request",
                "UPDATE credbroker_access_requests \
                 SET state = $2, due_at = $3, version = $4, body = $5 \
                 WHERE id = $1 AND version = $6",
                &[
                    &next.id,
                    &next.state.as_str(),
                    &next.due_at(),
                    &next.version,
                    &body,
                    &r.version,
                ],
            )
            .await?;
        Ok(n == 1)
    }

    async fn list_access(&self, filter: &AccessFilter) -> Result<Vec<AccessRequest>> {
        let mut sql =
            String::from("SELECT body, version FROM credbroker_access_requests WHERE true");
        let mut args: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
        if let Some(q) = &filter.requester {
            args.push(Box::new(q.clone()));
            sql.push_str(&format!(" AND requester = ${}", args.len()));
        }
        if !filter.states.is_empty() {
            sql.push_str(&format!(" AND state IN ({})", states_sql(&filter.states)));
        }
        let limit = filter.limit.unwrap_or(MAX_ACCESS_LIST).min(MAX_ACCESS_LIST);
        sql.push_str(&format!(" ORDER BY created_at DESC, id DESC LIMIT {limit}"));
        let rows = self
            .query_built("list access requests", &sql, &args)
            .await?;
        rows_to_requests(&rows)
    }

    async fn access_due(&self, now: DateTime<Utc>, limit: usize) -> Result<Vec<AccessRequest>> {
        let rows = self
            .query(
                "access requests due",
                "SELECT body, version FROM credbroker_access_requests \
                 WHERE due_at IS NOT NULL AND due_at <= $1 ORDER BY due_at, id LIMIT $2",
                &[&now, &(limit as i64)],
            )
            .await?;
        rows_to_requests(&rows)
    }
}
