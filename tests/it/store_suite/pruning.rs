//! Pruning at volume: rows written around the store API, then pruned
//! in batches while the lease path keeps writing.

use super::*;

/// `n` rows written around the store API, for volume. `revoked_at` is set
/// on live rows too (no store does that), to show the pruner goes by state.
pub struct Bulk {
    pub tag: &'static str,
    pub n: usize,
    pub state: LeaseState,
    pub revoked_at: DateTime<Utc>,
}

/// Test-only bulk insert, straight into the store's table. The store must
/// be closed: one writer per file (the broker's `.lock`).
pub async fn bulk_insert(home: &StoreHome, batches: &[Bulk]) {
    let now = Utc::now();
    let (expires, due) = (t(now, 3600), t(now, 3600));
    if let Some(path) = home.sqlite_path.clone() {
        let rows: Vec<(String, usize, String, i64)> = batches
            .iter()
            .map(|b| {
                (
                    b.tag.to_string(),
                    b.n,
                    b.state.as_str().to_string(),
                    ms(b.revoked_at),
                )
            })
            .collect();
        tokio::task::spawn_blocking(move || {
            let mut c = rusqlite::Connection::open(path).unwrap();
            let tx = c.transaction().unwrap();
            {
                let mut insert = tx
                    .prepare(
                        "INSERT INTO leases (id, role, database, kind, username, identity, state, \
                         issued_at, expires_at, max_expires_at, due_at, revoked_at) \
                         VALUES (?1, 'ro', 'main', 'postgres', ?2, ?3, ?4, ?5, ?6, ?6, ?7, ?8)",
                    )
                    .unwrap();
                for (tag, n, state, revoked_at) in rows {
                    for i in 0..n {
                        insert
                            .execute(rusqlite::params![
                                format!("l_{tag}{i:010}"),
                                format!("b_{tag}_{i}"),
                                APP,
                                state,
                                ms(now),
                                ms(expires),
                                ms(due),
                                revoked_at
                            ])
                            .unwrap();
                    }
                }
            }
            tx.commit().unwrap();
        })
        .await
        .unwrap();
        return;
    }
    let c = cluster()
        .connect(home.pg_database.as_deref().unwrap())
        .await
        .unwrap();
    for b in batches {
        c.execute(
            "INSERT INTO credbroker_leases (id, role, database, kind, username, identity, state, \
             issued_at, expires_at, max_expires_at, due_at, revoked_at) \
             SELECT 'l_' || $1::text || lpad(g::text, 10, '0'), 'ro', 'main', 'postgres', \
                    'b_' || $1::text || '_' || g, $2::text, $3::text, $4, $5, $5, $6, $7 \
             FROM generate_series(1, $8::int) g",
            &[
                &b.tag,
                &APP,
                &b.state.as_str(),
                &now,
                &expires,
                &due,
                &b.revoked_at,
                &(b.n as i32),
            ],
        )
        .await
        .unwrap();
    }
}

/// 100,000 old revoked rows go, in batches, while intents keep being
/// written and activated; every live row and every recent revoked one stays.
pub async fn case_pruning_deletes_only_old_revoked_rows(home: StoreHome) {
    let now = Utc::now();
    let before = t(now, -24 * 3600);
    let (old, recent) = (t(now, -30 * 24 * 3600), t(now, -3600));

    let s = (home.open)().await;
    let act = active(&s, 1, "ro", APP, 600).await;
    let pend = lease(2, "ro", APP, now, 600);
    s.insert_intent(&pend, None).await.unwrap();
    let fail = active(&s, 3, "ro", APP, 600).await;
    s.record_failure(&fail.id, "stuck", t(now, 60), true)
        .await
        .unwrap();
    let kept = active(&s, 4, "ro", APP, 600).await;
    s.mark_revoked(std::slice::from_ref(&kept.id), recent)
        .await
        .unwrap();
    let gone = active(&s, 5, "ro", APP, 600).await;
    s.mark_revoked(std::slice::from_ref(&gone.id), old)
        .await
        .unwrap();
    drop(s);
    let loaded = Instant::now();
    bulk_insert(
        &home,
        &[
            Bulk {
                tag: "old",
                n: 100_000,
                state: LeaseState::Revoked,
                revoked_at: old,
            },
            Bulk {
                tag: "new",
                n: 500,
                state: LeaseState::Revoked,
                revoked_at: recent,
            },
            Bulk {
                tag: "act",
                n: 200,
                state: LeaseState::Active,
                revoked_at: old,
            },
            Bulk {
                tag: "fai",
                n: 200,
                state: LeaseState::Failing,
                revoked_at: old,
            },
            Bulk {
                tag: "pen",
                n: 100,
                state: LeaseState::Pending,
                revoked_at: old,
            },
        ],
    )
    .await;
    let loaded = loaded.elapsed();
    let s = (home.open)().await;

    // The lease path, running all along: issue (capped, as a broker does),
    // activate, and now and then revoke (a recent revocation: kept).
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (s, stop) = (s.clone(), stop.clone());
        tokio::spawn(async move {
            let (mut live, mut revoked, mut worst) = (0usize, 0usize, Duration::ZERO);
            let mut errors = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let l = lease(1_000_000 + i, "rw", APP, Utc::now(), 600);
                let started = Instant::now();
                let r = match s.insert_intent(&l, Some(1_000_000)).await {
                    Ok(()) => s.activate(&l.id).await,
                    Err(e) => Err(e),
                };
                worst = worst.max(started.elapsed());
                if let Err(e) = r {
                    errors.push(e.to_string());
                    continue;
                }
                if i % 10 == 0 {
                    s.mark_revoked(std::slice::from_ref(&l.id), Utc::now())
                        .await
                        .unwrap();
                    revoked += 1;
                } else {
                    live += 1;
                }
            }
            (live, revoked, worst, errors)
        })
    };
    // Let the writer get going first, so pruning overlaps it throughout.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let metrics = Arc::new(Metrics::new());
    let pruner = Pruner::new(s.clone(), metrics.clone());
    let started = Instant::now();
    let pruned = pruner.prune(before).await.unwrap();
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let (live, revoked, worst, errors) = writer.await.unwrap();
    eprintln!(
        "pruning: bulk load {loaded:?}; {pruned} rows pruned in {took:?}; \
         meanwhile {} intents written and activated, slowest {worst:?}",
        live + revoked
    );
    assert!(
        errors.is_empty(),
        "the lease path failed during pruning: {errors:?}"
    );
    assert!(
        live + revoked > 10,
        "the writer hardly ran: {}",
        live + revoked
    );
    assert_eq!(pruned, 100_001);
    assert_eq!(metrics.pruned.get(), 100_001);

    let list = |states: Vec<LeaseState>| {
        let s = s.clone();
        async move {
            s.list(&LeaseFilter {
                states,
                ..Default::default()
            })
            .await
            .unwrap()
        }
    };
    let left = list(vec![LeaseState::Revoked]).await;
    assert!(left.iter().all(|l| l.revoked_at.unwrap() >= before));
    assert_eq!(left.len(), 500 + 1 + revoked, "a recent revoked row went");
    let live_rows = list(vec![
        LeaseState::Pending,
        LeaseState::Active,
        LeaseState::Failing,
    ])
    .await;
    assert_eq!(live_rows.len(), 500 + 3 + live, "a live row went");
    for l in [&act, &pend, &fail, &kept] {
        assert!(s.get(&l.id).await.unwrap().is_some(), "{} went", l.id);
    }
    assert!(s.get(&gone.id).await.unwrap().is_none());
    assert_eq!(
        pruner.prune(before).await.unwrap(),
        0,
        "nothing is left to prune"
    );
    assert_eq!(
        s.prune_revoked(Utc::now(), 10).await.unwrap(),
        10,
        "a batch is at most `limit` rows"
    );
}

store_suite! {
    stores: [],
    openers: [],
    homes: [case_pruning_deletes_only_old_revoked_rows],
}
