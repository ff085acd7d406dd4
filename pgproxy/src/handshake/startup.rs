//! The startup packet's checks, pure: protocol version, `_pq_.` options
//! (NegotiateProtocolVersion), TLS required, replication refused, the user name, and
//! the session parameters the client asked for — every parameter except `user`,
//! `database`, `replication`, `options` and `_pq_.*`, plus the settings in `options`,
//! which is split like PostgreSQL's `pg_split_opts` and read like
//! `process_postgres_switches` (`-c name=value`, `-cname=value`, `--name=value`; a `-`
//! in a name becomes `_`).
//!
//! Order is PostgreSQL's: the settings from `options` come first, the other parameters
//! after them, so a parameter sent on its own wins over the same one in `options`
//! (`application_name=a` with `options=-c application_name=b` gives `a`).
//!
//! Names are checked here because the session replays them as SQL (`SET name = ...`):
//! a name that cannot be a setting gets PostgreSQL's answer — 42704 "unrecognized
//! configuration parameter" without a dot, 42602 "invalid configuration parameter name"
//! for a dotted name that is not two or more identifiers. Whether a well-formed name
//! is a setting the server knows is the server's (and the session's) business.
//! Limits: only ASCII identifiers are accepted (PostgreSQL also accepts non-ASCII
//! letters in custom names), and `options` switches other than `-c`/`--` (`-e`, `-d`, ...)
//! are refused with 0A000.
//!
//! These errors are not sent at once: PostgreSQL reports them after authentication,
//! and so does the proxy ([`StartupRequest::session_params`] is a `Result`).

use crate::error::ProxyError;
use crate::wire::PROTOCOL_3_0;

/// What a client asked for in an acceptable startup packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupRequest {
    pub user: String,
    /// `database`, or the user name when absent or empty.
    pub database: String,
    /// Send NegotiateProtocolVersion naming these unsupported `_pq_.` options (the
    /// client asked for a newer 3.x or sent such options).
    pub negotiate: Option<Vec<String>>,
    /// The session parameters in the order they apply, or the error PostgreSQL gives
    /// for them after authentication.
    pub session_params: Result<Vec<(String, String)>, ProxyError>,
}

/// Checks a startup packet. `tls`: the connection is encrypted; `tls_required`: the
/// proxy refuses plaintext clients.
pub fn check_startup(
    version: i32,
    params: &[(String, String)],
    tls: bool,
    tls_required: bool,
) -> Result<StartupRequest, ProxyError> {
    let (major, minor) = ((version >> 16) as u16, (version & 0xffff) as u16);
    if major != 3 {
        return Err(ProxyError::UnsupportedProtocol { major, minor });
    }
    // The last occurrence of a key counts, as in PostgreSQL.
    let get = |k: &str| {
        params
            .iter()
            .rev()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    };
    let unsupported: Vec<String> = params
        .iter()
        .filter(|(k, _)| k.starts_with("_pq_."))
        .map(|(k, _)| k.clone())
        .collect();
    let negotiate = (version != PROTOCOL_3_0 || !unsupported.is_empty()).then_some(unsupported);
    if tls_required && !tls {
        return Err(ProxyError::TlsRequired);
    }
    if get("replication").is_some_and(|v| !matches!(v, "false" | "off" | "0" | "no")) {
        return Err(ProxyError::ReplicationRefused);
    }
    let Some(user) = get("user").filter(|u| !u.is_empty()) else {
        return Err(ProxyError::NoUserName);
    };
    let database = get("database").filter(|d| !d.is_empty()).unwrap_or(user);
    Ok(StartupRequest {
        user: user.to_owned(),
        database: database.to_owned(),
        negotiate,
        session_params: session_params(params),
    })
}

/// The settings a startup packet asks for, in the order they apply (see the module doc).
pub fn session_params(params: &[(String, String)]) -> Result<Vec<(String, String)>, ProxyError> {
    let mut out = Vec::new();
    // `options` may appear more than once; PostgreSQL keeps the last.
    if let Some((_, options)) = params.iter().rev().find(|(k, _)| k == "options") {
        for (name, value) in parse_options(options)? {
            check_param_name(&name)?;
            out.push((name, value));
        }
    }
    for (name, value) in params {
        if matches!(
            name.as_str(),
            "user" | "database" | "replication" | "options"
        ) || name.starts_with("_pq_.")
        {
            continue;
        }
        check_param_name(name)?;
        out.push((name.clone(), value.clone()));
    }
    Ok(out)
}

/// Splits `options` into words like PostgreSQL's `pg_split_opts`: words are separated
/// by whitespace; a backslash takes the next character literally (a trailing one is dropped).
pub fn split_options(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut chars = options.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| is_c_space(*c)) {
            chars.next();
        }
        if chars.peek().is_none() {
            return words;
        }
        let mut word = String::new();
        let mut escaped = false;
        while let Some(&c) = chars.peek() {
            if is_c_space(c) && !escaped {
                break;
            }
            chars.next();
            if !escaped && c == '\\' {
                escaped = true;
            } else {
                escaped = false;
                word.push(c);
            }
        }
        words.push(word);
    }
}

/// C's `isspace` in the C locale.
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// Reads the settings out of `options` (see the module doc). Errors carry
/// PostgreSQL 15's messages and come in its order: glibc's `getopt` handles every
/// switch first and leaves the other words (and all after `--`) for the end, where
/// the first of them is refused.
pub fn parse_options(options: &str) -> Result<Vec<(String, String)>, ProxyError> {
    let words = split_options(options);
    let mut out = Vec::new();
    let mut others: Vec<&str> = Vec::new();
    let mut i = 0;
    while i < words.len() {
        let word = words[i].as_str();
        i += 1;
        if word == "--" {
            others.extend(words[i..].iter().map(String::as_str));
            break;
        }
        let Some(rest) = word.strip_prefix('-').filter(|r| !r.is_empty()) else {
            others.push(word);
            continue;
        };
        let (flag, attached) = if let Some(a) = rest.strip_prefix('-') {
            ('-', a)
        } else if let Some(a) = rest.strip_prefix('c') {
            ('c', a)
        } else {
            return Err(ProxyError::UnsupportedStartupOption {
                switch: word.chars().take(2).collect(),
            });
        };
        // The switch's argument is the rest of the word, or the next word.
        let arg = if attached.is_empty() {
            match words.get(i) {
                Some(next) => {
                    i += 1;
                    next.as_str()
                }
                None => return Err(invalid_argument(word)),
            }
        } else {
            attached
        };
        let Some((name, value)) = arg.split_once('=') else {
            let message = if flag == '-' {
                format!("--{arg} requires a value")
            } else {
                format!("-c {arg} requires a value")
            };
            return Err(ProxyError::InvalidStartupOption { message });
        };
        out.push((name.replace('-', "_"), value.to_owned()));
    }
    match others.first() {
        Some(word) => Err(invalid_argument(word)),
        None => Ok(out),
    }
}

fn invalid_argument(word: &str) -> ProxyError {
    ProxyError::InvalidStartupOption {
        message: format!("invalid command-line argument for server process: {word}"),
    }
}

/// Whether `name` can name a setting (see the module doc).
pub fn check_param_name(name: &str) -> Result<(), ProxyError> {
    if name.contains('.') {
        if name.split('.').all(is_identifier) {
            return Ok(());
        }
        return Err(ProxyError::InvalidParameterName {
            name: name.to_owned(),
        });
    }
    if is_identifier(name) {
        Ok(())
    } else {
        Err(ProxyError::UnknownParameter {
            name: name.to_owned(),
        })
    }
}

/// An ASCII SQL identifier: a letter or `_`, then letters, digits, `_` or `$`.
fn is_identifier(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$')
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::SqlState;
    use proptest::prelude::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn options_split_like_pg_split_opts() {
        assert_eq!(
            split_options(r"  -c a=1   -c\ b=2 "),
            ["-c", "a=1", "-c b=2"]
        );
        assert_eq!(split_options(r"a\\b\ c"), [r"a\b c"]);
        assert_eq!(split_options("x\t\ny\x0bz"), ["x", "y", "z"]);
        // A trailing backslash escapes nothing and is dropped.
        assert_eq!(split_options(r"tail\"), ["tail"]);
        assert!(split_options(" \t ").is_empty());
    }

    #[test]
    fn options_settings_in_all_three_spellings() {
        // Values PostgreSQL 15 showed for the same options (checked against a server).
        assert_eq!(
            parse_options(r"-c application_name=a\ b\\c\ ").unwrap(),
            p(&[("application_name", r"a b\c ")])
        );
        assert_eq!(
            parse_options("-capplication_name=x  --application-name=y").unwrap(),
            p(&[("application_name", "x"), ("application_name", "y")])
        );
        assert_eq!(
            parse_options("--search_path=s1\t-c\tstatement_timeout=5s").unwrap(),
            p(&[("search_path", "s1"), ("statement_timeout", "5s")])
        );
        assert_eq!(
            parse_options("-c application_name=").unwrap(),
            p(&[("application_name", "")])
        );
        assert_eq!(
            parse_options("-c application_name=a=b").unwrap(),
            p(&[("application_name", "a=b")])
        );
        assert_eq!(parse_options("-c a.b-c=1").unwrap(), p(&[("a.b_c", "1")]));
        assert_eq!(parse_options("").unwrap(), vec![]);
    }

    #[test]
    fn malformed_options_get_postgresqls_errors() {
        let msg = |o: &str| match parse_options(o).unwrap_err() {
            e @ ProxyError::InvalidStartupOption { .. } => {
                assert_eq!(e.sqlstate(), SqlState::SyntaxError);
                e.message()
            }
            other => panic!("{o}: {other:?}"),
        };
        assert_eq!(msg("-c foo"), "-c foo requires a value");
        assert_eq!(msg("-ce"), "-c e requires a value");
        assert_eq!(msg("--foo"), "--foo requires a value");
        assert_eq!(
            msg("word"),
            "invalid command-line argument for server process: word"
        );
        assert_eq!(
            msg("-c"),
            "invalid command-line argument for server process: -c"
        );
        assert_eq!(
            msg("-- application_name=w"),
            "invalid command-line argument for server process: application_name=w"
        );
        assert_eq!(
            msg("-"),
            "invalid command-line argument for server process: -"
        );
        // Switches are read before other words are refused (glibc getopt permutes).
        assert_eq!(msg("word -c foo"), "-c foo requires a value");
        assert_eq!(
            msg("word -c application_name=x"),
            "invalid command-line argument for server process: word"
        );
        assert_eq!(
            msg("-c a.b=1 --  x"),
            "invalid command-line argument for server process: x"
        );
        assert_eq!(msg("-c x -c"), "-c x requires a value");
        assert_eq!(
            parse_options("-c application_name=x --").unwrap(),
            p(&[("application_name", "x")])
        );
        let e = parse_options("-e").unwrap_err();
        assert_eq!(e.sqlstate(), SqlState::FeatureNotSupported);
    }

    #[test]
    fn parameter_names_are_checked_like_postgresql_does() {
        for ok in ["application_name", "TimeZone", "a.b", "my_ext.x$1", "_x"] {
            check_param_name(ok).unwrap();
        }
        for (bad, state) in [
            ("a b", SqlState::UndefinedObject),
            ("", SqlState::UndefinedObject),
            ("x=1;DROP TABLE t", SqlState::UndefinedObject),
            ("1abc", SqlState::UndefinedObject),
            ("a.b c", SqlState::InvalidName),
            ("a..b", SqlState::InvalidName),
            ("a.", SqlState::InvalidName),
            ("é.x", SqlState::InvalidName),
        ] {
            assert_eq!(
                check_param_name(bad).unwrap_err().sqlstate(),
                state,
                "{bad:?}"
            );
        }
        assert_eq!(
            check_param_name("a b").unwrap_err().message(),
            "unrecognized configuration parameter \"a b\""
        );
        assert_eq!(
            check_param_name("a.b c").unwrap_err().message(),
            "invalid configuration parameter name \"a.b c\""
        );
    }

    #[test]
    fn every_parameter_reaches_the_session_options_first() {
        let params = p(&[
            ("user", "app"),
            ("application_name", "a"),
            ("database", "db"),
            ("_pq_.x", "1"),
            ("options", "-c application_name=b --work-mem=64kB"),
            ("replication", "false"),
            ("nosuch", "1"),
            ("DateStyle", "ISO"),
        ]);
        let r = check_startup(PROTOCOL_3_0, &params, false, false).unwrap();
        assert_eq!((r.user.as_str(), r.database.as_str()), ("app", "db"));
        assert_eq!(r.negotiate, Some(vec!["_pq_.x".to_owned()]));
        assert_eq!(
            r.session_params.unwrap(),
            p(&[
                ("application_name", "b"),
                ("work_mem", "64kB"),
                ("application_name", "a"),
                ("nosuch", "1"),
                ("DateStyle", "ISO"),
            ])
        );
    }

    #[test]
    fn a_bad_parameter_is_kept_for_after_authentication() {
        let r = check_startup(
            PROTOCOL_3_0,
            &p(&[("user", "app"), ("options", "-c foo")]),
            false,
            false,
        )
        .unwrap();
        assert_eq!(r.database, "app");
        assert_eq!(
            r.session_params.unwrap_err().sqlstate(),
            SqlState::SyntaxError
        );
    }

    #[test]
    fn startup_refusals() {
        let user = p(&[("user", "u")]);
        let err = |v: i32, params: &[(String, String)], tls: bool, req: bool| {
            check_startup(v, params, tls, req).unwrap_err()
        };
        assert_eq!(
            err(0x0009_0000, &user, false, false),
            ProxyError::UnsupportedProtocol { major: 9, minor: 0 }
        );
        assert_eq!(
            err(PROTOCOL_3_0, &user, false, true),
            ProxyError::TlsRequired
        );
        check_startup(PROTOCOL_3_0, &user, true, true).unwrap();
        assert_eq!(
            err(
                PROTOCOL_3_0,
                &p(&[("user", "u"), ("replication", "database")]),
                false,
                false
            ),
            ProxyError::ReplicationRefused
        );
        assert_eq!(
            err(PROTOCOL_3_0, &p(&[("user", "")]), false, false),
            ProxyError::NoUserName
        );
        assert_eq!(err(PROTOCOL_3_0, &[], false, false), ProxyError::NoUserName);
        // A newer minor version is negotiated down.
        let r = check_startup(PROTOCOL_3_0 + 2, &user, false, false).unwrap();
        assert_eq!(r.negotiate, Some(vec![]));
        // The last `user` counts.
        let r = check_startup(
            PROTOCOL_3_0,
            &p(&[("user", "a"), ("user", "b")]),
            false,
            false,
        )
        .unwrap();
        assert_eq!(r.user, "b");
    }

    proptest! {
        /// Whatever a client sends, every name that reaches the session is safe to
        /// splice into `SET name = ...`.
        #[test]
        fn accepted_names_are_identifiers(name in "\\PC{0,12}", options in "\\PC{0,40}") {
            let params = vec![
                ("user".to_owned(), "u".to_owned()),
                (name, "v".to_owned()),
                ("options".to_owned(), options),
            ];
            if let Ok(list) = session_params(&params) {
                for (n, _) in list {
                    prop_assert!(n.split('.').all(is_identifier), "{n:?}");
                }
            }
        }
    }
}
