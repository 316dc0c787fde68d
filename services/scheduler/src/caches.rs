//! Each project's cache index, folded from the log, and the eviction decision over it.
//!
//! * [`CacheIndex::apply`] folds `CacheSaved` (an archive now exists under its key), a
//!   `CacheRestored` hit (it was used) and `CacheEvicted` (it is gone). Last use is the time of
//!   the latest save or hit (`Envelope.time_us`): no clock.
//! * [`evict`] says which archives to delete so a project's caches fit its size limit: least
//!   recently used first, ties by key, never the one just saved unless it alone is over the
//!   limit. Pure, property-tested.
//!
//! A lease carries its project's entries ([`CacheIndex::entries`]): a restore trusts their
//! size and sha256, and the agent that saved an archive decides eviction with [`evict`].
//!
//! Every save of a key is an archive of its own (`tributary_objects::keys::cache`), so a save
//! never changes the archive another job is restoring. A save of a key the index already
//! has (two builds saving it at once, or a save after a broken archive) *supersedes* the
//! earlier archive: it leaves the entries for [`CacheIndex::superseded`] (time: when it was
//! superseded), and once [`SUPERSEDED_GRACE_US`] has passed ([`superseded_to_delete`]), the
//! project's next save deletes it with a `CacheEvicted`. The grace leaves time to jobs whose
//! leases still name it.

use std::collections::BTreeMap;

use tributary_proto::api::CacheEntry;
use tributary_proto::events::{envelope::Payload, Envelope};

/// How long a superseded archive is kept for the jobs whose leases still name it.
pub const SUPERSEDED_GRACE_US: i64 = 3600 * 1_000_000;

/// Cache entries by (tenant, project), then by key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CacheIndex {
    projects: BTreeMap<(String, String), BTreeMap<String, CacheEntry>>,
    /// Archives replaced by a later save of their key and not deleted yet, by (tenant,
    /// project), then by object key; `last_used_us` is when they were superseded.
    superseded: BTreeMap<(String, String), BTreeMap<String, CacheEntry>>,
}

impl CacheIndex {
    /// Folds one event (any build, any project).
    pub fn apply(&mut self, env: &Envelope) {
        let project = (env.tenant.clone(), env.project.clone());
        match &env.payload {
            Some(Payload::CacheSaved(e)) => {
                let replaced = self.projects.entry(project.clone()).or_default().insert(
                    e.key.clone(),
                    CacheEntry {
                        key: e.key.clone(),
                        object_key: e.object_key.clone(),
                        size: e.size,
                        sha256: e.sha256.clone(),
                        last_used_us: env.time_us,
                    },
                );
                // An archive of its own (not one written over): it waits to be deleted.
                if let Some(old) = replaced.filter(|old| old.object_key != e.object_key) {
                    self.superseded.entry(project).or_default().insert(
                        old.object_key.clone(),
                        CacheEntry {
                            last_used_us: env.time_us,
                            ..old
                        },
                    );
                }
            }
            Some(Payload::CacheRestored(e)) if e.hit => {
                let entry = self
                    .projects
                    .get_mut(&project)
                    .and_then(|p| p.get_mut(&e.key));
                if let Some(entry) = entry {
                    // Only a hit on the archive the index knows counts as a use of it.
                    if entry.sha256 == e.sha256 {
                        entry.last_used_us = entry.last_used_us.max(env.time_us);
                    }
                }
            }
            Some(Payload::CacheEvicted(e)) => {
                if let Some(p) = self.superseded.get_mut(&project) {
                    p.remove(&e.object_key);
                    if p.is_empty() {
                        self.superseded.remove(&project);
                    }
                }
                if let Some(p) = self.projects.get_mut(&project) {
                    // A newer save of the same key (after the eviction was decided) stays.
                    if p.get(&e.key).is_some_and(|c| {
                        c.object_key == e.object_key && c.last_used_us <= e.last_used_us
                    }) {
                        p.remove(&e.key);
                    }
                }
            }
            _ => {}
        }
    }

    /// The project's entries, by key.
    pub fn entries(&self, tenant: &str, project: &str) -> Vec<CacheEntry> {
        self.projects
            .get(&(tenant.to_owned(), project.to_owned()))
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The project's superseded archives not deleted yet (`last_used_us`: when superseded).
    pub fn superseded(&self, tenant: &str, project: &str) -> Vec<CacheEntry> {
        self.superseded
            .get(&(tenant.to_owned(), project.to_owned()))
            .map(|p| p.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Bytes the project's archives take.
    pub fn total(&self, tenant: &str, project: &str) -> u64 {
        self.entries(tenant, project).iter().map(|e| e.size).sum()
    }
}

/// The entries to delete so that the rest fit `limit` bytes (0 = no limit): least recently
/// used first (ties: smaller key first). `keep` (the archive just saved) goes last, only if it
/// alone is over the limit.
pub fn evict(entries: &[CacheEntry], limit: u64, keep: &str) -> Vec<CacheEntry> {
    if limit == 0 {
        return Vec::new();
    }
    let mut total: u64 = entries.iter().map(|e| e.size).sum();
    let mut order: Vec<&CacheEntry> = entries.iter().collect();
    order.sort_by(|a, b| {
        (a.key == keep, a.last_used_us, &a.key).cmp(&(b.key == keep, b.last_used_us, &b.key))
    });
    let mut out = Vec::new();
    for e in order {
        if total <= limit {
            break;
        }
        total -= e.size;
        out.push(e.clone());
    }
    out
}

/// The superseded archives whose grace is over at `now_us`: to delete.
pub fn superseded_to_delete(superseded: &[CacheEntry], now_us: i64) -> Vec<CacheEntry> {
    superseded
        .iter()
        .filter(|e| now_us.saturating_sub(e.last_used_us) >= SUPERSEDED_GRACE_US)
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tributary_proto::events::{CacheEvicted, CacheRestored, CacheSaved};

    fn entry(key: &str, size: u64, t: i64) -> CacheEntry {
        CacheEntry {
            key: key.into(),
            object_key: format!("caches/t/p/{key}.tar"),
            size,
            sha256: format!("sha-{key}"),
            last_used_us: t,
        }
    }

    fn env(t: i64, payload: Payload) -> Envelope {
        let mut e = Envelope::new("t", "p", "b", payload);
        e.time_us = t;
        e
    }

    #[test]
    fn least_recently_used_go_first_until_under_the_limit() {
        let entries = [entry("a", 40, 3), entry("b", 40, 1), entry("c", 40, 2)];
        let keys = |v: Vec<CacheEntry>| v.into_iter().map(|e| e.key).collect::<Vec<_>>();
        assert_eq!(keys(evict(&entries, 100, "a")), ["b"]);
        assert_eq!(keys(evict(&entries, 50, "a")), ["b", "c"]);
        assert_eq!(keys(evict(&entries, 120, "a")), Vec::<String>::new());
        assert_eq!(keys(evict(&entries, 0, "a")), Vec::<String>::new());
        // The one just saved goes last, even when it is the oldest.
        assert_eq!(keys(evict(&entries, 50, "b")), ["c", "a"]);
        assert_eq!(keys(evict(&entries, 10, "b")), ["c", "a", "b"]);
    }

    #[test]
    fn the_index_folds_saves_hits_and_evictions() {
        let mut index = CacheIndex::default();
        let saved = |key: &str, size| {
            Payload::CacheSaved(CacheSaved {
                key: key.into(),
                size,
                sha256: format!("sha-{key}"),
                object_key: format!("caches/t/p/{key}.tar"),
                ..CacheSaved::default()
            })
        };
        index.apply(&env(10, saved("a", 5)));
        index.apply(&env(20, saved("b", 7)));
        index.apply(&env(
            30,
            Payload::CacheRestored(CacheRestored {
                key: "a".into(),
                hit: true,
                sha256: "sha-a".into(),
                ..CacheRestored::default()
            }),
        ));
        assert_eq!(
            index.entries("t", "p"),
            [entry("a", 5, 30), entry("b", 7, 20)]
        );
        assert_eq!(index.total("t", "p"), 12);
        assert!(index.entries("t", "other").is_empty());
        index.apply(&env(
            40,
            Payload::CacheEvicted(CacheEvicted {
                key: "b".into(),
                object_key: "caches/t/p/b.tar".into(),
                size: 7,
                last_used_us: 20,
                ..CacheEvicted::default()
            }),
        ));
        assert_eq!(index.entries("t", "p"), [entry("a", 5, 30)]);
        assert!(index.superseded("t", "p").is_empty());
    }

    #[test]
    fn a_save_of_a_known_key_supersedes_its_archive_until_evicted() {
        let mut index = CacheIndex::default();
        let saved = |object: &str| {
            Payload::CacheSaved(CacheSaved {
                key: "a".into(),
                size: 5,
                sha256: format!("sha-{object}"),
                object_key: format!("caches/t/p/a/{object}.tar"),
                ..CacheSaved::default()
            })
        };
        index.apply(&env(10, saved("s1")));
        index.apply(&env(20, saved("s2")));
        let current = index.entries("t", "p");
        assert_eq!(current.len(), 1);
        assert_eq!(current[0].object_key, "caches/t/p/a/s2.tar");
        // s1 waits, dated by when s2 superseded it.
        let old = index.superseded("t", "p");
        assert_eq!(old.len(), 1);
        assert_eq!(old[0].object_key, "caches/t/p/a/s1.tar");
        assert_eq!(old[0].last_used_us, 20);
        assert!(superseded_to_delete(&old, 20 + SUPERSEDED_GRACE_US - 1).is_empty());
        assert_eq!(
            superseded_to_delete(&old, 20 + SUPERSEDED_GRACE_US),
            old.clone()
        );
        // A hit on the superseded archive does not make it current again.
        index.apply(&env(
            30,
            Payload::CacheRestored(CacheRestored {
                key: "a".into(),
                hit: true,
                sha256: "sha-s1".into(),
                ..CacheRestored::default()
            }),
        ));
        assert_eq!(index.entries("t", "p")[0].object_key, "caches/t/p/a/s2.tar");
        assert_eq!(index.entries("t", "p")[0].last_used_us, 20);
        // Its deletion leaves the current archive alone.
        index.apply(&env(
            40,
            Payload::CacheEvicted(CacheEvicted {
                key: "a".into(),
                object_key: "caches/t/p/a/s1.tar".into(),
                size: 5,
                last_used_us: 20,
                ..CacheEvicted::default()
            }),
        ));
        assert!(index.superseded("t", "p").is_empty());
        assert_eq!(index.entries("t", "p")[0].object_key, "caches/t/p/a/s2.tar");
        // An archive written over in place (the layout before one object per save) is not
        // superseded: there is nothing else to delete.
        index.apply(&env(50, saved("s2")));
        assert!(index.superseded("t", "p").is_empty());
    }

    proptest! {
        /// After eviction the rest fits the limit (or only the kept one is left), only what
        /// was needed went, and everything evicted was used no later than everything kept
        /// (the kept key aside).
        #[test]
        fn eviction_is_lru_and_minimal(
            specs in proptest::collection::btree_map("[a-e]{1,2}", (0u64..100, 0i64..50), 0..12),
            limit in 1u64..400,
            keep_first in any::<bool>(),
        ) {
            let entries: Vec<CacheEntry> =
                specs.iter().map(|(k, (s, t))| entry(k, *s, *t)).collect();
            let keep = if keep_first {
                entries.first().map(|e| e.key.clone()).unwrap_or_default()
            } else {
                String::new()
            };
            let gone = evict(&entries, limit, &keep);
            let gone_keys: Vec<&str> = gone.iter().map(|e| e.key.as_str()).collect();
            let left: Vec<&CacheEntry> =
                entries.iter().filter(|e| !gone_keys.contains(&e.key.as_str())).collect();
            let left_total: u64 = left.iter().map(|e| e.size).sum();
            prop_assert!(left_total <= limit);
            if let Some(last) = gone.last() {
                // Minimal: without the last eviction the rest would not fit.
                prop_assert!(left_total + last.size > limit);
            }
            for g in gone.iter().filter(|g| g.key != keep) {
                for l in left.iter().filter(|l| l.key != keep) {
                    prop_assert!((g.last_used_us, &g.key) <= (l.last_used_us, &l.key));
                }
            }
            if gone_keys.contains(&keep.as_str()) {
                prop_assert!(left.is_empty());
            }
        }
    }
}
