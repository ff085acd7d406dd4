//! The key layout of a region's Redis result cache and the rule that decides
//! whether a cached entry may be served (DESIGN.md §5 "Regional cache", §6).
//!
//! | key | type | written by |
//! |---|---|---|
//! | `meridian:<cluster>:e<epoch>:c:<hash>` | string: one cache entry | pgproxy |
//! | `meridian:<cluster>:e<epoch>:t:<schema.table>` | set of entry keys reading the table | pgproxy (add), agent (delete) |
//! | `meridian:<cluster>:wm:<schema.table>` | decimal `u64` LSN: invalidation watermark | agent only, never lowered |
//! | `meridian:<cluster>:e<epoch>:fresh` | decimal `u64` LSN with an expiry: the region's freshness lease | agent only |
//! | channel `meridian:invalidate` | JSON [`InvalidationEvent`] | agent |
//!
//! Entry and tag keys carry the cluster epoch, so a failover makes the old
//! cache unreachable at once and `FlushCache` only reclaims memory. Watermarks
//! carry no epoch: LSNs keep increasing across a promotion (the new timeline
//! continues from the old position), so an old watermark stays a valid bound.
//!
//! The freshness lease says that the invalidation stream reaches this region:
//! an agent of the region keeps it (`SET ... PX`) only while every change its
//! own node had replayed a moment ago has been applied here (the value is the
//! invalidation horizon it last heard of, for operators). A proxy serves no
//! entry while the lease is missing, so a stalled stream anywhere between the
//! primary and this Redis makes the cache miss instead of serving stale data.
//!
//! Table names are always `schema.table` as the catalog spells them (the
//! `public` schema explicit, case as stored: the caller folds unquoted SQL
//! identifiers to lower case before calling [`normalize_table`]). This module only
//! builds strings and decides; it never talks to Redis.

use serde::{Deserialize, Serialize};

use crate::epoch::Epoch;
use crate::lsn::Lsn;

/// Pub/sub channel of invalidation events for applications' own caches.
pub const INVALIDATE_CHANNEL: &str = "meridian:invalidate";

/// `schema.table` for `name`; a name without a schema is in `public`.
pub fn normalize_table(name: &str) -> String {
    if name.contains('.') {
        name.to_owned()
    } else {
        format!("public.{name}")
    }
}

/// Common prefix of every key of `cluster`: `meridian:<cluster>:`.
pub fn cluster_prefix(cluster: &str) -> String {
    format!("meridian:{cluster}:")
}

/// `meridian:<cluster>:e<epoch>:`: prefix of the entry and tag keys of one epoch.
pub fn epoch_prefix(cluster: &str, epoch: Epoch) -> String {
    format!("meridian:{cluster}:e{}:", epoch.0)
}

/// Key of the cache entry whose identity hashes to `hash` (hex or any printable form).
pub fn entry_key(cluster: &str, epoch: Epoch, hash: &str) -> String {
    format!("{}c:{hash}", epoch_prefix(cluster, epoch))
}

/// Key of the set of entry keys of `epoch` that read `table` (normalized first).
pub fn tag_key(cluster: &str, epoch: Epoch, table: &str) -> String {
    format!(
        "{}t:{}",
        epoch_prefix(cluster, epoch),
        normalize_table(table)
    )
}

/// Key of `table`'s invalidation watermark (normalized first).
pub fn watermark_key(cluster: &str, table: &str) -> String {
    format!("meridian:{cluster}:wm:{}", normalize_table(table))
}

/// A watermark's stored value: the LSN as a decimal `u64`.
pub fn watermark_value(lsn: Lsn) -> String {
    lsn.0.to_string()
}

/// Parses a stored watermark; `None` for anything that is not a decimal `u64`.
pub fn parse_watermark(value: &str) -> Option<Lsn> {
    value.trim().parse::<u64>().ok().map(Lsn)
}

/// The freshness lease of `epoch` (see the module documentation).
pub fn fresh_key(cluster: &str, epoch: Epoch) -> String {
    format!("{}fresh", epoch_prefix(cluster, epoch))
}

/// `SCAN MATCH` pattern for every entry and tag key of `cluster`, all epochs.
/// Glob characters in the cluster name are escaped.
pub fn all_epochs_pattern(cluster: &str) -> String {
    let mut escaped = String::with_capacity(cluster.len());
    for c in cluster.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    format!("meridian:{escaped}:e*")
}

/// The epoch of an entry, tag or freshness key of `cluster`, `None` for any
/// other key (watermarks included).
pub fn epoch_of_key(cluster: &str, key: &str) -> Option<Epoch> {
    let rest = key
        .strip_prefix(&cluster_prefix(cluster))?
        .strip_prefix('e')?;
    let (digits, tail) = rest.split_once(':')?;
    if !(tail.starts_with("c:") || tail.starts_with("t:") || tail == "fresh") {
        return None;
    }
    digits.parse::<u64>().ok().map(Epoch)
}

/// Whether `key` belongs to an epoch older than `current` (and may be dropped
/// by `FlushCache { epoch: current }`).
pub fn is_older_epoch_key(cluster: &str, key: &str, current: Epoch) -> bool {
    epoch_of_key(cluster, key).is_some_and(|e| e < current)
}

/// The cache validity rule: an entry read at `entry_lsn` may be served iff,
/// for every table it read, that table's watermark is absent or ≤ `entry_lsn`.
///
/// A late invalidation is harmless (it raises the watermark above entries that
/// are already stale, and they stop being served), and an entry refilled from a
/// lagging replica carries that replica's older LSN, so it is never served once
/// a newer change of its tables is known.
pub fn entry_is_valid<T>(entry_lsn: Lsn, watermarks: &[(T, Option<Lsn>)]) -> bool {
    watermarks
        .iter()
        .all(|(_, wm)| wm.is_none_or(|wm| wm <= entry_lsn))
}

/// The JSON event published on [`INVALIDATE_CHANNEL`]:
/// `{"tables":["public.t"],"lsn":"0/16B3748","epoch":3}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidationEvent {
    pub tables: Vec<String>,
    pub lsn: Lsn,
    pub epoch: Epoch,
}

impl InvalidationEvent {
    /// The event as published (JSON).
    pub fn to_json(&self) -> String {
        // Serialising strings, an `Lsn` and a number cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Relative etcd key (under `/meridian/<cluster>/`) of a region's cache state,
/// written by the active coordinator: `cache/<region>`.
pub fn etcd_region_key(region: &str) -> String {
    format!("cache/{region}")
}

/// Value of the etcd key `cache/<region>`: `{"usable": false, "since": <unix ms>}`.
/// While `usable` is false the region missed invalidations: proxies there must
/// neither serve nor store cache entries. An absent key means usable.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheRegionRecord {
    pub usable: bool,
    /// Unix time in milliseconds of the last change of `usable`.
    pub since: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layout() {
        assert_eq!(
            entry_key("prod", Epoch(3), "ab12"),
            "meridian:prod:e3:c:ab12"
        );
        assert_eq!(
            tag_key("prod", Epoch(3), "orders"),
            "meridian:prod:e3:t:public.orders"
        );
        assert_eq!(
            tag_key("prod", Epoch(3), "app.orders"),
            "meridian:prod:e3:t:app.orders"
        );
        assert_eq!(watermark_key("prod", "t"), "meridian:prod:wm:public.t");
        assert_eq!(INVALIDATE_CHANNEL, "meridian:invalidate");
    }

    #[test]
    fn watermark_values_are_decimal() {
        assert_eq!(watermark_value(Lsn(0x1_0000_0010)), "4294967312");
        assert_eq!(parse_watermark("4294967312"), Some(Lsn(0x1_0000_0010)));
        assert_eq!(parse_watermark("0/16B3748"), None);
        assert_eq!(parse_watermark(""), None);
    }

    #[test]
    fn epochs_are_read_back_from_keys() {
        let c = "prod";
        assert_eq!(
            epoch_of_key(c, &entry_key(c, Epoch(7), "x")),
            Some(Epoch(7))
        );
        assert_eq!(
            epoch_of_key(c, &tag_key(c, Epoch(12), "t")),
            Some(Epoch(12))
        );
        assert_eq!(epoch_of_key(c, &watermark_key(c, "t")), None);
        // The freshness lease of an old epoch goes with its entries.
        assert_eq!(epoch_of_key(c, &fresh_key(c, Epoch(3))), Some(Epoch(3)));
        assert!(is_older_epoch_key(c, &fresh_key(c, Epoch(3)), Epoch(4)));
        assert_eq!(epoch_of_key(c, "meridian:prod:e3:freshness"), None);
        assert_eq!(epoch_of_key("other", &entry_key(c, Epoch(7), "x")), None);
        assert_eq!(epoch_of_key(c, "meridian:prod:ex:c:1"), None);
        assert!(is_older_epoch_key(
            c,
            &entry_key(c, Epoch(2), "x"),
            Epoch(3)
        ));
        assert!(!is_older_epoch_key(
            c,
            &entry_key(c, Epoch(3), "x"),
            Epoch(3)
        ));
        assert!(!is_older_epoch_key(c, &watermark_key(c, "t"), Epoch(3)));
    }

    #[test]
    fn scan_pattern_escapes_globs() {
        assert_eq!(all_epochs_pattern("prod"), "meridian:prod:e*");
        assert_eq!(all_epochs_pattern("a*b?"), "meridian:a\\*b\\?:e*");
    }

    #[test]
    fn validity_rule() {
        let entry = Lsn(100);
        // No watermark for any table: valid.
        assert!(entry_is_valid(
            entry,
            &[("public.t", None), ("app.o", None)]
        ));
        // Watermark at the entry's LSN: the change is included in the entry.
        assert!(entry_is_valid(entry, &[("public.t", Some(Lsn(100)))]));
        assert!(entry_is_valid(entry, &[("public.t", Some(Lsn(99)))]));
        // One table changed after the read: invalid.
        assert!(!entry_is_valid(
            entry,
            &[("public.t", Some(Lsn(50))), ("app.o", Some(Lsn(101)))]
        ));
        // A refill from a lagging replica (older LSN) is not served.
        assert!(!entry_is_valid(Lsn(40), &[("public.t", Some(Lsn(50)))]));
        // An entry that read no table at all is valid.
        let none: [(&str, Option<Lsn>); 0] = [];
        assert!(entry_is_valid(entry, &none));
    }

    #[test]
    fn region_record_shape() {
        assert_eq!(etcd_region_key("eu"), "cache/eu");
        let rec = CacheRegionRecord {
            usable: false,
            since: 1_700_000_000_000,
        };
        assert_eq!(
            serde_json::to_string(&rec).unwrap(),
            r#"{"usable":false,"since":1700000000000}"#
        );
    }

    #[test]
    fn event_json_shape() {
        let ev = InvalidationEvent {
            tables: vec!["public.t".into()],
            lsn: Lsn(0x16B_3748),
            epoch: Epoch(3),
        };
        assert_eq!(
            ev.to_json(),
            r#"{"tables":["public.t"],"lsn":"0/16B3748","epoch":3}"#
        );
        let back: InvalidationEvent = serde_json::from_str(&ev.to_json()).unwrap();
        assert_eq!(back, ev);
    }
}
