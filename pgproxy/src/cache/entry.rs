//! The identity of a cache entry and its stored form.
//!
//! The key hashes (SHA-256) everything that can change a read's result bytes: database, user,
//! the session's parameters (`search_path`, `DateStyle`, `TimeZone`, ... as replayed on the
//! backends) and the exact query text. The stored value is a small header (format tag, the
//! [`Bracket`] of replay positions) followed by the backend's result messages as they came off
//! the wire (`RowDescription`, `DataRow`s, `CommandComplete`), so a hit writes them to the client
//! without decoding a row.

use bytes::{BufMut, Bytes, BytesMut};
use meridian_shared::lsn::Lsn;
use sha2::{Digest, Sha256};

use super::rules::Bracket;

const FORMAT: &[u8; 4] = b"MC1\n";
const HEADER: usize = FORMAT.len() + 16;

/// Hex digest identifying one cacheable read of one session context. `statement` is what the
/// client asked for: a simple query's text, or for the extended protocol the statement's text
/// and parameter types with the Bind message's formats and values ([`extended_identity`]).
pub fn entry_hash(
    database: &str,
    user: &str,
    params: &[(String, String)],
    statement: &[u8],
) -> String {
    let mut h = Sha256::new();
    for part in [database, user] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    h.update((sorted.len() as u64).to_be_bytes());
    for (k, v) in sorted {
        for part in [k, v] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
    }
    h.update(statement);
    let digest = h.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The statement identity of a simple query.
pub fn simple_identity(sql: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(sql.len() + 2);
    out.extend_from_slice(b"Q\0");
    out.extend_from_slice(sql.as_bytes());
    out
}

/// The statement identity of an extended-protocol execution: the statement's text and
/// parameter types, whether the portal was described, and the Bind message after its portal and
/// statement names (parameter formats, values, result formats).
pub fn extended_identity(
    sql: &str,
    param_types: &[u8],
    described: bool,
    bind_rest: &[u8],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(sql.len() + param_types.len() + bind_rest.len() + 32);
    out.extend_from_slice(b"E\0");
    for part in [sql.as_bytes(), param_types, bind_rest] {
        out.extend_from_slice(&(part.len() as u64).to_be_bytes());
        out.extend_from_slice(part);
    }
    out.push(u8::from(described));
    out
}

/// Encodes an entry: header, then the raw result messages.
pub fn encode(bracket: Bracket, messages: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(HEADER + messages.len());
    out.put_slice(FORMAT);
    out.put_u64(bracket.lower.0);
    out.put_u64(bracket.upper.0);
    out.put_slice(messages);
    out.freeze()
}

/// Decodes a stored entry; `None` for anything this version did not write.
pub fn decode(value: &[u8]) -> Option<(Bracket, &[u8])> {
    if value.len() < HEADER || &value[..FORMAT.len()] != FORMAT {
        return None;
    }
    let lower = u64::from_be_bytes(value[4..12].try_into().ok()?);
    let upper = u64::from_be_bytes(value[12..20].try_into().ok()?);
    if upper < lower {
        return None;
    }
    Some((
        Bracket {
            lower: Lsn(lower),
            upper: Lsn(upper),
        },
        &value[HEADER..],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let b = Bracket {
            lower: Lsn(7),
            upper: Lsn(9),
        };
        let v = encode(b, b"T\0\0\0\x04");
        assert_eq!(decode(&v), Some((b, &b"T\0\0\0\x04"[..])));
        assert_eq!(decode(b"MC1\n"), None);
        assert_eq!(decode(b"garbage that is long enough to pass"), None);
        let backwards = encode(
            Bracket {
                lower: Lsn(9),
                upper: Lsn(7),
            },
            b"",
        );
        assert_eq!(decode(&backwards), None);
    }

    #[test]
    fn hash_covers_every_part_of_the_identity() {
        let p = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect::<Vec<_>>()
        };
        let q = |sql: &str| simple_identity(sql);
        let base = entry_hash("db", "u", &p(&[("a", "1")]), &q("SELECT 1"));
        assert_eq!(base.len(), 32);
        assert_eq!(
            base,
            entry_hash("db", "u", &p(&[("a", "1")]), &q("SELECT 1"))
        );
        assert_ne!(
            base,
            entry_hash("db2", "u", &p(&[("a", "1")]), &q("SELECT 1"))
        );
        assert_ne!(
            base,
            entry_hash("db", "u2", &p(&[("a", "1")]), &q("SELECT 1"))
        );
        assert_ne!(
            base,
            entry_hash("db", "u", &p(&[("a", "2")]), &q("SELECT 1"))
        );
        assert_ne!(base, entry_hash("db", "u", &p(&[]), &q("SELECT 1")));
        assert_ne!(
            base,
            entry_hash("db", "u", &p(&[("a", "1")]), &q("SELECT 2"))
        );
        // Boundaries between parts are not ambiguous.
        assert_ne!(
            entry_hash("ab", "c", &[], &q("x")),
            entry_hash("a", "bc", &[], &q("x"))
        );
        // Simple and extended forms of the same text differ, and so do bound values.
        let e = |v: &[u8], described| extended_identity("SELECT 1", &[], described, v);
        assert_ne!(
            base,
            entry_hash("db", "u", &p(&[("a", "1")]), &e(b"", false))
        );
        assert_ne!(
            entry_hash("d", "u", &[], &e(b"\0\0\0\x01\0\0\0\x011\0\0", false)),
            entry_hash("d", "u", &[], &e(b"\0\0\0\x01\0\0\0\x012\0\0", false))
        );
        assert_ne!(
            entry_hash("d", "u", &[], &e(b"", true)),
            entry_hash("d", "u", &[], &e(b"", false))
        );
        // Parameter order does not matter.
        assert_eq!(
            entry_hash("d", "u", &p(&[("a", "1"), ("b", "2")]), &q("q")),
            entry_hash("d", "u", &p(&[("b", "2"), ("a", "1")]), &q("q"))
        );
    }
}
