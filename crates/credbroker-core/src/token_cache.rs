//! The Vault API's verified-token cache: the stored token a request's
//! token hash found, kept in memory so the next request with the same
//! token skips the store read. On a SQLite store that read queued behind
//! every write on the store's one thread (at 16 callers most of the Vault
//! door's cost over gRPC's); on PostgreSQL it was a round trip.
//!
//! What it holds and what it may answer:
//!
//! - **Keyed by the token's SHA-256** (the store's own key), never the
//!   token; an entry is the stored [`VaultToken`] — identity, certificate
//!   hash, accessor, expiry: everything `token::authenticate` checks, and
//!   it checks all of it on every request, hit or miss.
//! - **Bounded in size** ([`CAPACITY`]: the oldest entry goes first) and
//!   **in time** ([`MAX_AGE`] after it was read, and never past the
//!   token's own expiry: an entry whose token expired is a miss, so a
//!   renewal made elsewhere is read from the store rather than refused).
//! - **Forgotten** when the token is revoked, evicted, discarded or
//!   renewed through this broker (`broker/tokens.rs`), when an identity
//!   lock matches its identity (`broker/locks.rs`), and when another
//!   replica says so (`relay.rs` carries [`TokenGone`] through the
//!   PostgreSQL store). A forget bumps a generation: a store read that
//!   began before it cannot put back what it read (the read-then-revoke
//!   race), see [`TokenCache::insert`].
//! - Nothing negative is cached: an unknown token is read from the store
//!   every time, as before.
//!
//! The cache never decides alone what a token obtains: the gate still
//! reads locks on every request, and `vault_api::token` serves from the
//! cache only the actions whose store write checks the token again (a
//! lease is linked to its token as it activates, and `activate_linked`
//! refuses a gone token; renew-self's update finds no row) or that obtain
//! nothing (look-ups, revocations). A static password or a lease renewal
//! reads the token from the store.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::broadcast;
use tokio::time::Instant;

use crate::store::VaultToken;

/// Entries kept at most: a token is ~300 bytes here, so a few MB.
pub const CAPACITY: usize = 10_000;
/// How long an entry answers after it was read from the store: the
/// longest a token could outlive a forget that never reached this
/// replica (a relay down), and then it only reads and gives up.
pub const MAX_AGE: Duration = Duration::from_secs(30);

/// A token that must no longer be answered from any replica's cache.
/// Names the token by its accessor (already in audit records), never by
/// its hash or itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenGone {
    pub accessor: String,
    /// Made on another replica and relayed here (`relay.rs`): not sent on.
    pub relayed: bool,
}

/// Hits, misses, insertions refused by a forget that raced them, and
/// entries dropped for room — what the tests and the bench look at.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub hits: u64,
    pub misses: u64,
    pub raced: u64,
    pub evicted: u64,
}

struct Entry {
    token: VaultToken,
    read_at: Instant,
    /// Matches the `order` slot that made it (later slots of a forgotten
    /// and re-read token carry a newer one).
    seq: u64,
}

#[derive(Default)]
struct Inner {
    by_hash: HashMap<String, Entry>,
    by_accessor: HashMap<String, String>,
    /// Insertion order, for eviction; slots of forgotten entries stay
    /// until they reach the front (or a compaction).
    order: VecDeque<(String, u64)>,
    seq: u64,
    generation: u64,
    stats: Stats,
}

impl Inner {
    fn remove(&mut self, hash: &str) -> Option<Entry> {
        let e = self.by_hash.remove(hash)?;
        self.by_accessor.remove(&e.token.accessor);
        Some(e)
    }
}

/// See the module doc.
pub struct TokenCache {
    inner: Mutex<Inner>,
    capacity: usize,
    max_age: Duration,
    gone: broadcast::Sender<TokenGone>,
}

/// The generation a store read began in: [`TokenCache::insert`] takes
/// what it read only if no forget happened since.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

impl Default for TokenCache {
    fn default() -> Self {
        Self::new(CAPACITY, MAX_AGE)
    }
}

impl TokenCache {
    pub fn new(capacity: usize, max_age: Duration) -> Self {
        let (gone, _) = broadcast::channel(1024);
        TokenCache {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
            max_age,
            gone,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached token for `hash`, if it is younger than the cache's
    /// bound and not expired; otherwise None (and the stale entry goes).
    pub fn get(&self, hash: &str) -> Option<VaultToken> {
        let mut g = self.lock();
        let fresh = match g.by_hash.get(hash) {
            Some(e) => e.read_at.elapsed() < self.max_age && e.token.expires_at > Utc::now(),
            None => {
                g.stats.misses += 1;
                return None;
            }
        };
        if fresh {
            g.stats.hits += 1;
            return g.by_hash.get(hash).map(|e| e.token.clone());
        }
        g.remove(hash);
        g.stats.misses += 1;
        None
    }

    /// Taken before a store read whose answer may be cached.
    pub fn ticket(&self) -> Ticket {
        Ticket(self.lock().generation)
    }

    /// Caches `token` as read from the store under `ticket` — unless a
    /// forget happened since (it may have been this very token's revoke,
    /// committed after the read: caching the read would bring it back).
    pub fn insert(&self, ticket: Ticket, token: &VaultToken) {
        let mut g = self.lock();
        if g.generation != ticket.0 {
            g.stats.raced += 1;
            return;
        }
        g.remove(&token.hash);
        g.seq += 1;
        let seq = g.seq;
        g.by_accessor
            .insert(token.accessor.clone(), token.hash.clone());
        g.by_hash.insert(
            token.hash.clone(),
            Entry {
                token: token.clone(),
                read_at: Instant::now(),
                seq,
            },
        );
        g.order.push_back((token.hash.clone(), seq));
        while g.by_hash.len() > self.capacity {
            let Some((hash, seq)) = g.order.pop_front() else {
                break;
            };
            if g.by_hash.get(&hash).is_some_and(|e| e.seq == seq) {
                g.remove(&hash);
                g.stats.evicted += 1;
            }
        }
        // Slots of forgotten entries: never more than the live ones.
        if g.order.len() > 2 * self.capacity {
            let Inner { order, by_hash, .. } = &mut *g;
            order.retain(|(h, s)| by_hash.get(h).is_some_and(|e| e.seq == *s));
        }
    }

    /// Forgets the token named by `accessor` here, and (unless `gone` was
    /// relayed from another replica) tells the other replicas to.
    pub fn forget(&self, gone: TokenGone) {
        {
            let mut g = self.lock();
            g.generation += 1;
            if let Some(hash) = g.by_accessor.get(&gone.accessor).cloned() {
                g.remove(&hash);
            }
        }
        if !gone.relayed {
            // No receiver (no relay: SQLite, the tests) is fine.
            let _ = self.gone.send(gone);
        }
    }

    /// Forgets every token `accessors` name (a login's evictions).
    pub fn forget_all<'a>(&self, accessors: impl IntoIterator<Item = &'a String>) {
        for a in accessors {
            self.forget(TokenGone {
                accessor: a.clone(),
                relayed: false,
            });
        }
    }

    /// Forgets the tokens of every identity `locked` says yes to (an
    /// identity lock): the gate refuses them anyway, since it reads the
    /// locks on every request; this keeps no entry of theirs warm.
    pub fn forget_identities(&self, locked: impl Fn(&str) -> bool) -> usize {
        let mut g = self.lock();
        g.generation += 1;
        let hashes: Vec<String> = g
            .by_hash
            .iter()
            .filter(|(_, e)| locked(&e.token.identity))
            .map(|(h, _)| h.clone())
            .collect();
        for h in &hashes {
            g.remove(h);
        }
        hashes.len()
    }

    /// What this replica forgot on its own, for the relay to send on.
    pub fn tap(&self) -> broadcast::Receiver<TokenGone> {
        self.gone.subscribe()
    }

    pub fn len(&self) -> usize {
        self.lock().by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn stats(&self) -> Stats {
        self.lock().stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::testkit::vault_token as token;

    fn cached(c: &TokenCache, t: &VaultToken) {
        let ticket = c.ticket();
        c.insert(ticket, t);
    }

    #[tokio::test(start_paused = true)]
    async fn a_miss_then_a_hit_then_a_miss_after_the_age_bound() {
        let c = TokenCache::new(16, Duration::from_secs(30));
        let t = token(1, "spiffe://td/a");
        assert_eq!(c.get(&t.hash), None);
        cached(&c, &t);
        assert_eq!(c.get(&t.hash), Some(t.clone()));
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(c.get(&t.hash), Some(t.clone()), "still young");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(c.get(&t.hash), None, "older than the bound: read again");
        assert!(c.is_empty(), "and the stale entry went");
        assert_eq!(
            c.stats(),
            Stats {
                hits: 2,
                misses: 2,
                ..Stats::default()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_token_is_a_miss_whatever_its_age() {
        let c = TokenCache::default();
        let mut t = token(2, "spiffe://td/a");
        t.expires_at = Utc::now() - chrono::Duration::milliseconds(1);
        cached(&c, &t);
        assert_eq!(
            c.get(&t.hash),
            None,
            "the store says whether it was renewed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_forgotten_token_is_a_miss_and_is_announced_once() {
        let c = TokenCache::default();
        let mut tap = c.tap();
        let (t, u) = (token(3, "spiffe://td/a"), token(4, "spiffe://td/a"));
        cached(&c, &t);
        cached(&c, &u);
        c.forget(TokenGone {
            accessor: t.accessor.clone(),
            relayed: false,
        });
        assert_eq!(c.get(&t.hash), None, "revoked: never answered from memory");
        assert_eq!(c.get(&u.hash), Some(u.clone()), "another token stays");
        assert_eq!(tap.try_recv().unwrap().accessor, t.accessor);
        // A forget that came from another replica is not sent back.
        c.forget(TokenGone {
            accessor: u.accessor.clone(),
            relayed: true,
        });
        assert_eq!(c.get(&u.hash), None);
        assert!(tap.try_recv().is_err());
    }

    /// The read-then-revoke race: a store read that began before a revoke
    /// answers with the token; caching it would bring the revoked token
    /// back for the whole age bound.
    #[tokio::test(start_paused = true)]
    async fn a_read_that_raced_a_forget_is_not_cached() {
        let c = TokenCache::default();
        let t = token(5, "spiffe://td/a");
        let ticket = c.ticket();
        c.forget(TokenGone {
            accessor: t.accessor.clone(),
            relayed: false,
        });
        c.insert(ticket, &t);
        assert_eq!(c.get(&t.hash), None);
        assert_eq!(c.stats().raced, 1);
        // A read that began after it is cached as usual.
        cached(&c, &t);
        assert_eq!(c.get(&t.hash), Some(t));
    }

    #[tokio::test(start_paused = true)]
    async fn the_oldest_entry_goes_when_full() {
        let c = TokenCache::new(3, MAX_AGE);
        let ts: Vec<_> = (10..14).map(|n| token(n, "spiffe://td/a")).collect();
        for t in &ts {
            cached(&c, t);
            tokio::time::advance(Duration::from_millis(1)).await;
        }
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&ts[0].hash), None, "the oldest was dropped");
        for t in &ts[1..] {
            assert!(c.get(&t.hash).is_some());
        }
        assert_eq!(c.stats().evicted, 1);
        // A forgotten entry's slot does not make a live one go early, and
        // re-reading a token does not count it twice.
        c.forget(TokenGone {
            accessor: ts[1].accessor.clone(),
            relayed: true,
        });
        cached(&c, &ts[2]);
        cached(&c, &ts[0]);
        assert_eq!(c.len(), 3);
        for t in [&ts[0], &ts[2], &ts[3]] {
            assert!(c.get(&t.hash).is_some(), "{}", t.accessor);
        }
        // Many re-reads of one token keep the slots bounded.
        for _ in 0..100 {
            cached(&c, &ts[3]);
        }
        assert_eq!(c.len(), 3);
        assert!(c.lock().order.len() <= 6);
    }

    #[tokio::test(start_paused = true)]
    async fn an_identity_lock_forgets_that_identitys_tokens() {
        let c = TokenCache::default();
        let (a, b) = (token(20, "spiffe://td/a"), token(21, "spiffe://td/b"));
        cached(&c, &a);
        cached(&c, &b);
        assert_eq!(c.forget_identities(|i| i == "spiffe://td/a"), 1);
        assert_eq!(c.get(&a.hash), None);
        assert_eq!(c.get(&b.hash), Some(b));
    }
}
