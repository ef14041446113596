//! Vault-API tokens, their cap and their lease links.

use super::*;

/// Vault-API tokens: stored by hash, found by hash only, renewed, linked
/// to the leases they created as those become active, deleted with their
/// links, pruned once expired — and a second token's links are never
/// touched.
async fn case_vault_tokens_and_their_lease_links(s: Store) {
    use credbroker::store::VaultToken;
    let now = credbroker::lease::truncate_ms(Utc::now());
    let token = |n: u8, expires: i64| VaultToken {
        hash: format!("{n:02x}").repeat(32),
        accessor: format!("acc{n}"),
        identity: APP.to_string(),
        cert_sha256: "ab".repeat(32),
        issued_at: now,
        expires_at: t(now, expires),
    };
    let (a, b, old) = (token(1, 3600), token(2, 3600), token(3, -10));
    for tok in [&a, &b, &old] {
        assert!(s.insert_vault_token(tok, 32).await.unwrap().is_empty());
    }
    assert!(
        s.insert_vault_token(&a, 32).await.is_err(),
        "a token hash is stored once"
    );
    assert_eq!(s.vault_token(&a.hash).await.unwrap().as_ref(), Some(&a));
    assert_eq!(s.vault_token(&"ff".repeat(32)).await.unwrap(), None);

    assert!(s
        .set_vault_token_expiry(&a.hash, t(now, 7200))
        .await
        .unwrap());
    assert!(!s
        .set_vault_token_expiry(&"ff".repeat(32), now)
        .await
        .unwrap());
    assert_eq!(
        ms(s.vault_token(&a.hash).await.unwrap().unwrap().expires_at),
        ms(t(now, 7200))
    );

    let (l1, l2, l3, l4) = (
        pending(&s, 1, "ro", APP, 600).await,
        pending(&s, 2, "ro", APP, 600).await,
        pending(&s, 3, "ro", APP, 600).await,
        pending(&s, 4, "ro", APP, 600).await,
    );
    s.activate_linked(&l1.id, &a.accessor).await.unwrap();
    s.activate_linked(&l2.id, &a.accessor).await.unwrap();
    // Only an intent is activated and linked: a second time links nothing.
    match s.activate_linked(&l2.id, &b.accessor).await {
        Err(credbroker::Error::FailedPrecondition(_)) => {}
        other => panic!("an active lease activated again: {other:?}"),
    }
    s.activate_linked(&l3.id, &b.accessor).await.unwrap();
    // An expired token still stored still links (pruning takes it later).
    s.activate_linked(&l4.id, &old.accessor).await.unwrap();
    for l in [&l1, &l2, &l3, &l4] {
        let got = s.get(&l.id).await.unwrap().unwrap();
        assert_eq!(got.state, LeaseState::Active);
        assert_eq!(ms(got.due_at), ms(l.expires_at), "due at its expiry");
    }
    let mut got = s.vault_token_leases(&a.accessor).await.unwrap();
    got.sort();
    let mut want = vec![l1.id.clone(), l2.id.clone()];
    want.sort();
    assert_eq!(got, want);

    assert!(s.delete_vault_token(&a.hash).await.unwrap());
    assert!(!s.delete_vault_token(&a.hash).await.unwrap());
    assert!(s.vault_token(&a.hash).await.unwrap().is_none());
    assert!(s.vault_token_leases(&a.accessor).await.unwrap().is_empty());

    assert_eq!(
        s.prune_vault_tokens(now).await.unwrap(),
        1,
        "only the expired one"
    );
    assert!(s.vault_token(&old.hash).await.unwrap().is_none());
    assert!(s
        .vault_token_leases(&old.accessor)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(
        s.vault_token_leases(&b.accessor).await.unwrap(),
        vec![l3.id.clone()]
    );
    assert!(s.vault_token(&b.hash).await.unwrap().is_some());
    // Lease rows are untouched by any of it.
    assert!(s.get(&l1.id).await.unwrap().is_some());
}

/// A Vault-API token as a login stores it: `n` names it, `identity` and
/// `cert` bind it, it expires `expires` seconds after `now`.
fn vault_token(
    n: usize,
    identity: &str,
    cert: &str,
    now: DateTime<Utc>,
    expires: i64,
) -> credbroker::store::VaultToken {
    let now = credbroker::lease::truncate_ms(now);
    credbroker::store::VaultToken {
        hash: format!("{:064x}", n + 1),
        accessor: format!("acc{n:04}"),
        identity: identity.to_string(),
        cert_sha256: cert.repeat(32),
        issued_at: now,
        expires_at: t(now, expires),
    }
}

/// `max_tokens_per_identity`: a login beyond the cap evicts the
/// identity's token nearest its expiry (an expired one first, a renewed
/// one last), deletes it with its lease links (the lease rows stay), and
/// says which; another identity's tokens are never touched; a refused
/// insert (a hash stored twice) evicts nothing.
async fn case_vault_tokens_are_capped_per_identity(s: Store) {
    let other = "spiffe://credbroker.dev/ns/demo/other";
    let now = Utc::now();
    let (t1, t2, t3) = (
        vault_token(1, APP, "ab", now, 100),
        vault_token(2, APP, "cd", now, 200),
        vault_token(3, APP, "ab", now, 300),
    );
    let theirs = vault_token(9, other, "ef", now, 10);
    for tok in [&t1, &theirs, &t2, &t3] {
        assert!(s.insert_vault_token(tok, 3).await.unwrap().is_empty());
    }
    let lease = pending(&s, 1, "ro", APP, 600).await;
    s.activate_linked(&lease.id, &t1.accessor).await.unwrap();

    let t4 = vault_token(4, APP, "ab", now, 400);
    assert_eq!(
        s.insert_vault_token(&t4, 3).await.unwrap(),
        vec![t1.accessor.clone()],
        "the one nearest its expiry makes room"
    );
    assert!(s.vault_token(&t1.hash).await.unwrap().is_none(), "evicted");
    assert!(s.vault_token_leases(&t1.accessor).await.unwrap().is_empty());
    // A request that authenticated just before the eviction links no
    // lease to the gone token: refused, nothing left behind.
    let late = pending(&s, 2, "ro", APP, 600).await;
    match s.activate_linked(&late.id, &t1.accessor).await {
        Err(credbroker::Error::PermissionDenied(m)) => assert!(m.contains("log in again"), "{m}"),
        other => panic!("a link to an evicted token: {other:?}"),
    }
    assert_eq!(
        s.get(&late.id).await.unwrap().unwrap().state,
        LeaseState::Pending,
        "refused as one step: not active without its link"
    );
    assert!(s.vault_token_leases(&t1.accessor).await.unwrap().is_empty());
    assert!(
        s.get(&lease.id).await.unwrap().is_some(),
        "its lease stays, to end at its own expiry"
    );
    for tok in [&t2, &t3, &t4, &theirs] {
        assert!(s.vault_token(&tok.hash).await.unwrap().is_some());
    }

    // A renewed token is a live client's: the unrenewed one goes first.
    assert!(s
        .set_vault_token_expiry(&t2.hash, t(now, 900))
        .await
        .unwrap());
    let t5 = vault_token(5, APP, "ab", now, 500);
    assert_eq!(
        s.insert_vault_token(&t5, 3).await.unwrap(),
        vec![t3.accessor.clone()]
    );

    // The same hash twice is refused and evicts nothing.
    assert!(s.insert_vault_token(&t5, 3).await.is_err());
    for tok in [&t2, &t4, &t5] {
        assert!(s.vault_token(&tok.hash).await.unwrap().is_some());
    }

    // A smaller cap (a config change) evicts down to it at the next login,
    // expired tokens first.
    let expired = vault_token(6, APP, "ab", now, -5);
    assert_eq!(
        s.insert_vault_token(&expired, 32).await.unwrap(),
        Vec::<String>::new()
    );
    let t7 = vault_token(7, APP, "ab", now, 700);
    assert_eq!(
        s.insert_vault_token(&t7, 2).await.unwrap(),
        vec![
            expired.accessor.clone(),
            t4.accessor.clone(),
            t5.accessor.clone()
        ]
    );
    assert!(s.vault_token(&t2.hash).await.unwrap().is_some());
    assert!(s.vault_token(&t7.hash).await.unwrap().is_some());

    // Cap 1: each login replaces the identity's one token.
    let t8 = vault_token(8, APP, "ab", now, 800);
    let mut gone = s.insert_vault_token(&t8, 1).await.unwrap();
    gone.sort();
    assert_eq!(gone, vec![t2.accessor.clone(), t7.accessor.clone()]);
    assert!(
        s.vault_token(&theirs.hash).await.unwrap().is_some(),
        "another identity is never evicted, even expiring first"
    );
}

/// 60 parallel logins of one identity, on two handles (two replicas on a
/// shared store), against a cap of 8: exactly 8 tokens stay, the newest
/// one among them; each of the other 52 was evicted by exactly one login
/// and is gone; the other identity's token is untouched.
pub async fn case_vault_token_cap_holds_under_concurrency(open: Opener, shared: bool) {
    let first = open().await;
    let second = if shared { open().await } else { first.clone() };
    let other = "spiffe://credbroker.dev/ns/demo/other";
    let now = Utc::now();
    let theirs = vault_token(999, other, "ef", now, 1);
    first.insert_vault_token(&theirs, 8).await.unwrap();
    let tokens: Vec<_> = (0..60)
        .map(|i| vault_token(i, APP, "ab", now, 100 + i as i64))
        .collect();
    let tasks: Vec<_> = tokens
        .iter()
        .enumerate()
        .map(|(i, tok)| {
            let s = if i % 2 == 0 { &first } else { &second }.clone();
            let tok = tok.clone();
            tokio::spawn(async move { s.insert_vault_token(&tok, 8).await })
        })
        .collect();
    let mut evicted = Vec::new();
    for task in tasks {
        evicted.extend(task.await.unwrap().unwrap());
    }
    let unique: BTreeSet<&String> = evicted.iter().collect();
    assert_eq!(
        evicted.len(),
        52,
        "each eviction reported once: {evicted:?}"
    );
    assert_eq!(unique.len(), 52);
    let mut kept = 0;
    for tok in &tokens {
        let stored = second.vault_token(&tok.hash).await.unwrap();
        assert_eq!(
            stored.is_some(),
            !unique.contains(&tok.accessor),
            "{} is stored iff not evicted",
            tok.accessor
        );
        kept += usize::from(stored.is_some());
    }
    assert_eq!(kept, 8, "the cap holds under parallel logins");
    assert!(first.vault_token(&theirs.hash).await.unwrap().is_some());
    // Serially, the cap keeps the ones furthest from expiry.
    let last = vault_token(60, APP, "ab", now, 10_000);
    let gone = first.insert_vault_token(&last, 8).await.unwrap();
    assert_eq!(gone.len(), 1);
    assert!(first.vault_token(&last.hash).await.unwrap().is_some());
}

store_suite! {
    stores: [
        case_vault_tokens_and_their_lease_links,
        case_vault_tokens_are_capped_per_identity,
    ],
    openers: [case_vault_token_cap_holds_under_concurrency],
    homes: [],
}
