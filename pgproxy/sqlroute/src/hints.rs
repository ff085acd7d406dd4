//! Routing hints in the comments that open a query.
//!
//! Only comments before the first SQL token count, so a hint cannot be smuggled in through a
//! string literal or a comment in the middle of a statement. Inside a comment that starts with
//! `meridian:` the words are directives: `primary`, `cache ttl=<duration>` (`500ms`, `30s`, `5m`,
//! `1h`, `1m30s`; a bare number means seconds), `min_lsn=<X/Y>` (hexadecimal LSN).
//! Unknown words and malformed values are ignored; a bare `cache` without `ttl=` is ignored too
//! (the proxy's configured cache rules decide then). This is a scanner for comments only, not
//! a SQL parser.

use std::time::Duration;

use crate::analysis::Hints;

const PREFIX: &str = "meridian:";

/// The hints in the leading comments of `sql`.
pub fn parse_hints(sql: &str) -> Hints {
    let mut hints = Hints::default();
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        match split_comment(rest) {
            Some((body, after)) => {
                apply_comment(body, &mut hints);
                rest = after;
            }
            None => return hints,
        }
    }
}

/// The text after the leading comments and blanks of `sql`.
pub(crate) fn skip_leading_comments(sql: &str) -> &str {
    let mut rest = sql;
    loop {
        rest = rest.trim_start();
        if let Some((_, after)) = split_comment(rest) {
            rest = after;
        } else {
            return rest;
        }
    }
}

/// If `s` starts with a comment: its body and the text after it. Block comments nest, as in
/// PostgreSQL; an unterminated block comment runs to the end.
fn split_comment(s: &str) -> Option<(&str, &str)> {
    if let Some(line) = s.strip_prefix("--") {
        return Some(match line.find('\n') {
            Some(end) => (&line[..end], &line[end + 1..]),
            None => (line, ""),
        });
    }
    let block = s.strip_prefix("/*")?;
    let bytes = block.as_bytes();
    let mut depth = 1usize;
    let mut i = 0;
    while i + 1 < bytes.len() {
        match (bytes[i], bytes[i + 1]) {
            (b'/', b'*') => {
                depth += 1;
                i += 2;
            }
            (b'*', b'/') => {
                depth -= 1;
                if depth == 0 {
                    return Some((&block[..i], &block[i + 2..]));
                }
                i += 2;
            }
            _ => i += 1,
        }
    }
    Some((block, ""))
}

fn apply_comment(body: &str, hints: &mut Hints) {
    let body = body.trim();
    if !starts_with_ignore_case(body, PREFIX) {
        return;
    }
    let words = body.split(|c: char| c.is_whitespace() || c == ',');
    for word in words.filter(|w| !w.is_empty()) {
        let word = if starts_with_ignore_case(word, PREFIX) {
            &word[PREFIX.len()..]
        } else {
            word
        };
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word, None),
        };
        match (key.to_ascii_lowercase().as_str(), value) {
            ("primary", None) => hints.primary = true,
            ("ttl", Some(v)) => {
                if let Some(ttl) = parse_duration(v) {
                    hints.cache_ttl = Some(ttl);
                }
            }
            ("min_lsn", Some(v)) if is_lsn(v) => hints.min_lsn = Some(v.to_ascii_uppercase()),
            _ => {}
        }
    }
}

fn starts_with_ignore_case(s: &str, prefix: &str) -> bool {
    s.len() >= prefix.len()
        && s.is_char_boundary(prefix.len())
        && s[..prefix.len()].eq_ignore_ascii_case(prefix)
}

/// `30`, `30s`, `500ms`, `5m`, `1h`, `1m30s`. A bare number is seconds.
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = rest[..unit_len].to_ascii_lowercase();
        rest = &rest[unit_len..];
        let part = match unit.as_str() {
            "" | "s" | "sec" | "secs" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            "m" | "min" | "mins" => Duration::from_secs(n.checked_mul(60)?),
            "h" | "hr" | "hour" | "hours" => Duration::from_secs(n.checked_mul(3600)?),
            _ => return None,
        };
        total = total.checked_add(part)?;
        if unit.is_empty() && !rest.is_empty() {
            return None;
        }
    }
    Some(total)
}

/// `X/Y` with 1..=8 hexadecimal digits on each side, as PostgreSQL prints a `pg_lsn`.
pub(crate) fn is_lsn(s: &str) -> bool {
    let hex = |p: &str| !p.is_empty() && p.len() <= 8 && p.bytes().all(|b| b.is_ascii_hexdigit());
    matches!(s.split_once('/'), Some((hi, lo)) if hex(hi) && hex(lo))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_cache_and_lsn_hints() {
        let h = parse_hints("/* meridian:primary */ SELECT 1");
        assert!(h.primary);
        assert_eq!(h.cache_ttl, None);
        let h = parse_hints("/* meridian:cache ttl=30s */SELECT 1");
        assert_eq!(h.cache_ttl, Some(Duration::from_secs(30)));
        assert!(!h.primary);
        let h = parse_hints("/*meridian:min_lsn=0/16b3748*/ SELECT 1");
        assert_eq!(h.min_lsn.as_deref(), Some("0/16B3748"));
    }

    #[test]
    fn several_comments_and_line_comments() {
        let h = parse_hints(
            "-- meridian:cache ttl=1m30s\n /* plain */ /* meridian:primary */ SELECT 1",
        );
        assert!(h.primary);
        assert_eq!(h.cache_ttl, Some(Duration::from_secs(90)));
        let h = parse_hints("/* meridian:primary meridian:min_lsn=A/B */ SELECT 1");
        assert!(h.primary);
        assert_eq!(h.min_lsn.as_deref(), Some("A/B"));
    }

    #[test]
    fn hints_after_the_first_token_are_ignored() {
        let h = parse_hints("SELECT 1 /* meridian:primary */");
        assert_eq!(h, Hints::default());
        let h = parse_hints("SELECT '/* meridian:primary */'");
        assert_eq!(h, Hints::default());
    }

    #[test]
    fn malformed_values_are_ignored() {
        let h = parse_hints("/* meridian:cache ttl=soon min_lsn=xyz primary=1 */ SELECT 1");
        assert_eq!(h, Hints::default());
        let h = parse_hints("/* not meridian:primary */ SELECT 1");
        assert!(!h.primary);
    }

    #[test]
    fn nested_and_unterminated_comments() {
        let h = parse_hints("/* a /* nested */ still comment */ /* meridian:primary */ SELECT");
        assert!(h.primary);
        assert_eq!(
            skip_leading_comments("/* a /* b */ c */ SELECT 1"),
            "SELECT 1"
        );
        assert_eq!(skip_leading_comments("/* never ends"), "");
        assert_eq!(skip_leading_comments("-- only"), "");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("5x"), None);
        assert_eq!(parse_duration("99999999999999999999h"), None);
        assert!(is_lsn("0/0"));
        assert!(!is_lsn("0/"));
        assert!(!is_lsn("123456789/0"));
    }
}
