//! The one error edge: every error the proxy itself raises towards a client is a
//! [`ProxyError`] value, and only here does it become what the client sees — a SQLSTATE
//! ([`SqlState`], never a literal elsewhere), a message without internal detail (no
//! addresses, no server-side reasons the client cannot act on) and a fixed-cardinality
//! label for the `errors_total` metric.
//!
//! Errors the *server* sends (an `ErrorResponse` from a backend) are not translated: they
//! pass through as the server wrote them. Internal detail (which backend, the I/O error)
//! is logged where the error is handled, not sent.

use std::fmt;

use crate::wire::{self, Frame};

/// A SQLSTATE the proxy raises itself. `as_str` is the five-character code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SqlState {
    /// 08006 connection_failure
    ConnectionFailure,
    /// 08P01 protocol_violation
    ProtocolViolation,
    /// 0A000 feature_not_supported
    FeatureNotSupported,
    /// 22023 invalid_parameter_value
    InvalidParameterValue,
    /// 25P02 in_failed_sql_transaction
    InFailedSqlTransaction,
    /// 26000 invalid_sql_statement_name
    InvalidSqlStatementName,
    /// 28000 invalid_authorization_specification
    InvalidAuthorization,
    /// 28P01 invalid_password
    InvalidPassword,
    /// 34000 invalid_cursor_name
    InvalidCursorName,
    /// 3D000 invalid_catalog_name (a missing database: the server's, passed through)
    InvalidCatalogName,
    /// 42601 syntax_error
    SyntaxError,
    /// 42602 invalid_name
    InvalidName,
    /// 42704 undefined_object
    UndefinedObject,
    /// 42P05 duplicate_prepared_statement
    DuplicatePreparedStatement,
    /// 53300 too_many_connections
    TooManyConnections,
    /// 54000 program_limit_exceeded
    ProgramLimitExceeded,
    /// 55P02 cant_change_runtime_param
    CantChangeRuntimeParam,
    /// 57014 query_canceled
    QueryCanceled,
    /// 57P01 admin_shutdown
    AdminShutdown,
}

impl SqlState {
    pub fn as_str(self) -> &'static str {
        match self {
            SqlState::ConnectionFailure => "08006",
            SqlState::ProtocolViolation => "08P01",
            SqlState::FeatureNotSupported => "0A000",
            SqlState::InvalidParameterValue => "22023",
            SqlState::InFailedSqlTransaction => "25P02",
            SqlState::InvalidSqlStatementName => "26000",
            SqlState::InvalidAuthorization => "28000",
            SqlState::InvalidPassword => "28P01",
            SqlState::InvalidCursorName => "34000",
            SqlState::InvalidCatalogName => "3D000",
            SqlState::SyntaxError => "42601",
            SqlState::InvalidName => "42602",
            SqlState::UndefinedObject => "42704",
            SqlState::DuplicatePreparedStatement => "42P05",
            SqlState::TooManyConnections => "53300",
            SqlState::ProgramLimitExceeded => "54000",
            SqlState::CantChangeRuntimeParam => "55P02",
            SqlState::QueryCanceled => "57014",
            SqlState::AdminShutdown => "57P01",
        }
    }
}

impl fmt::Display for SqlState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How bad an error is for the client's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The statement fails; the session goes on.
    Error,
    /// The connection ends after the message.
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// Every error the proxy raises towards a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    // --- before the session: negotiation, startup packet, admission, login ---
    /// The startup packet could not be read (bad length, malformed parameters).
    InvalidStartupPacket,
    /// A second SSLRequest, or bytes pipelined behind one before the TLS handshake.
    UnexpectedStartupPacket,
    UnsupportedProtocol {
        major: u16,
        minor: u16,
    },
    TlsRequired,
    ReplicationRefused,
    NoUserName,
    TooManyClients,
    /// The startup packet or authentication did not finish within `client_login_timeout`.
    LoginTimeout,
    /// An authentication message longer than the pre-authentication limit.
    AuthMessageTooLong,
    /// Authentication failed (wrong password, unknown user: the same answer).
    PasswordFailed {
        user: String,
    },
    /// The user may not log in (method not allowed, not configured, database not allowed).
    NotAuthorized {
        reason: String,
    },
    /// The client broke the authentication exchange (the text is fixed, never client data).
    AuthProtocol(&'static str),
    /// Bytes arrived behind an SSLRequest (`gss: false`) or GSSENCRequest before its
    /// answer: unencrypted data that may have been injected (PostgreSQL's CVE-2021-23214 check).
    DataAfterEncryptionRequest {
        gss: bool,
    },
    /// The `options` startup parameter could not be parsed (PostgreSQL's message).
    InvalidStartupOption {
        message: String,
    },
    /// An `options` switch other than `-c name=value` / `--name=value`.
    UnsupportedStartupOption {
        switch: String,
    },
    /// A startup parameter that cannot name any setting (no dot, not an identifier).
    UnknownParameter {
        name: String,
    },
    /// A dotted startup parameter name that is not two or more identifiers.
    InvalidParameterName {
        name: String,
    },
    /// The login the proxy made on the client's behalf was refused (class 28 from the
    /// server, or credentials the proxy lacks); `reason` is the server's or the proxy's
    /// text, which the client and its operator need to fix `pg_hba.conf` or the config.
    BackendLoginFailed {
        reason: String,
    },
    /// TLS towards the server failed (e.g. an unknown certificate issuer).
    BackendTls {
        reason: String,
    },

    // --- during the session ---
    /// A message the proxy cannot frame or decode (the text is fixed).
    InvalidMessage(&'static str),
    /// A message longer than `max_message_size`.
    MessageTooLong {
        len: usize,
        max: usize,
    },
    /// A message type that is not a frontend message.
    UnknownMessageType(u8),
    /// `Parse` of a statement name the client already uses.
    DuplicatePreparedStatement {
        name: String,
    },
    /// The proxy could not get a backend for the statement (the reason is logged, not sent).
    NoBackend,
    /// Every connection of the client's pool stayed in use for `pool.query_wait_timeout`.
    PoolWaitTimeout {
        waited_ms: u128,
        pool_size: u32,
    },
    /// The failover hold ran out without a serving primary.
    NoPrimary {
        held_ms: u128,
    },
    /// The statement's backend was lost; `in_tx`: inside a transaction (rolled back).
    BackendLost {
        in_tx: bool,
    },
    /// The transaction's backend was lost earlier: statements fail until it ends.
    TransactionLost,
    /// A `meridian.*` setting got a bad value.
    InvalidSetting {
        message: String,
    },
    /// A `meridian.*` setting the client may not change.
    ReadOnlySetting {
        name: &'static str,
    },
    /// The proxy is shutting down.
    ShuttingDown,
}

impl ProxyError {
    pub fn sqlstate(&self) -> SqlState {
        use ProxyError::*;
        match self {
            InvalidStartupPacket | UnexpectedStartupPacket | AuthProtocol(_) => {
                SqlState::ProtocolViolation
            }
            InvalidMessage(_) | UnknownMessageType(_) => SqlState::ProtocolViolation,
            AuthMessageTooLong => SqlState::ProtocolViolation,
            DataAfterEncryptionRequest { .. } => SqlState::ProtocolViolation,
            InvalidStartupOption { .. } => SqlState::SyntaxError,
            UnsupportedStartupOption { .. } => SqlState::FeatureNotSupported,
            UnknownParameter { .. } => SqlState::UndefinedObject,
            InvalidParameterName { .. } => SqlState::InvalidName,
            BackendLoginFailed { .. } => SqlState::InvalidAuthorization,
            BackendTls { .. } => SqlState::ConnectionFailure,
            MessageTooLong { .. } => SqlState::ProgramLimitExceeded,
            UnsupportedProtocol { .. } | ReplicationRefused => SqlState::FeatureNotSupported,
            TlsRequired | NoUserName | NotAuthorized { .. } => SqlState::InvalidAuthorization,
            PasswordFailed { .. } => SqlState::InvalidPassword,
            TooManyClients | PoolWaitTimeout { .. } => SqlState::TooManyConnections,
            LoginTimeout => SqlState::QueryCanceled,
            DuplicatePreparedStatement { .. } => SqlState::DuplicatePreparedStatement,
            NoBackend | NoPrimary { .. } | BackendLost { .. } => SqlState::ConnectionFailure,
            TransactionLost => SqlState::InFailedSqlTransaction,
            InvalidSetting { .. } => SqlState::InvalidParameterValue,
            ReadOnlySetting { .. } => SqlState::CantChangeRuntimeParam,
            ShuttingDown => SqlState::AdminShutdown,
        }
    }

    /// The fixed-cardinality label of the `errors_total` metric.
    pub fn label(&self) -> &'static str {
        use ProxyError::*;
        match self {
            InvalidStartupPacket | UnexpectedStartupPacket => "invalid_startup",
            UnsupportedProtocol { .. } => "unsupported_protocol",
            TlsRequired => "tls_required",
            ReplicationRefused => "replication_refused",
            NoUserName => "no_user",
            TooManyClients => "too_many_clients",
            LoginTimeout => "login_timeout",
            AuthMessageTooLong | AuthProtocol(_) => "auth_protocol",
            DataAfterEncryptionRequest { .. } => "invalid_startup",
            InvalidStartupOption { .. } | UnsupportedStartupOption { .. } => "invalid_options",
            UnknownParameter { .. } | InvalidParameterName { .. } => "invalid_parameter",
            BackendLoginFailed { .. } => "backend_login_refused",
            BackendTls { .. } => "backend_tls",
            PasswordFailed { .. } => "auth_failed",
            NotAuthorized { .. } => "not_authorized",
            InvalidMessage(_) | UnknownMessageType(_) => "protocol_violation",
            MessageTooLong { .. } => "message_too_long",
            DuplicatePreparedStatement { .. } => "duplicate_statement",
            NoBackend => "no_backend",
            PoolWaitTimeout { .. } => "pool_wait_timeout",
            NoPrimary { .. } => "no_primary",
            BackendLost { .. } => "backend_lost",
            TransactionLost => "transaction_lost",
            InvalidSetting { .. } | ReadOnlySetting { .. } => "bad_setting",
            ShuttingDown => "shutting_down",
        }
    }

    /// The message the client reads.
    pub fn message(&self) -> String {
        use ProxyError::*;
        match self {
            InvalidStartupPacket => "invalid startup packet".into(),
            UnexpectedStartupPacket => "unexpected startup packet".into(),
            UnsupportedProtocol { major, minor } => format!(
                "unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
            ),
            TlsRequired => {
                "meridian-pgproxy requires TLS (sslmode=require) for every connection".into()
            }
            ReplicationRefused => "replication connections are not supported through meridian-pgproxy; connect to the node directly".into(),
            NoUserName => "no PostgreSQL user name specified in startup packet".into(),
            TooManyClients => "sorry, too many clients already".into(),
            LoginTimeout => "canceling authentication due to timeout".into(),
            AuthMessageTooLong => "authentication message too long".into(),
            PasswordFailed { user } => {
                format!("password authentication failed for user \"{user}\"")
            }
            NotAuthorized { reason } => reason.clone(),
            AuthProtocol(what) => what.to_string(),
            DataAfterEncryptionRequest { gss: false } => {
                "received unencrypted data after SSL request".into()
            }
            DataAfterEncryptionRequest { gss: true } => {
                "received unencrypted data after GSSAPI encryption request".into()
            }
            InvalidStartupOption { message } => message.clone(),
            UnsupportedStartupOption { switch } => format!(
                "meridian-pgproxy accepts only -c name=value and --name=value in options, not {switch}"
            ),
            UnknownParameter { name } => format!("unrecognized configuration parameter \"{name}\""),
            InvalidParameterName { name } => {
                format!("invalid configuration parameter name \"{name}\"")
            }
            BackendLoginFailed { reason } => format!("backend login failed: {reason}"),
            BackendTls { reason } => {
                format!("meridian-pgproxy: TLS to the server failed: {reason}")
            }
            InvalidMessage(what) => format!("invalid message format: {what}"),
            MessageTooLong { len, max } => {
                format!("message of {len} bytes exceeds the limit of {max} bytes")
            }
            UnknownMessageType(t) => format!("invalid frontend message type {t}"),
            DuplicatePreparedStatement { name } => {
                format!("prepared statement \"{name}\" already exists")
            }
            NoBackend => "meridian-pgproxy: no server available for the statement".into(),
            PoolWaitTimeout { waited_ms, pool_size } => format!(
                "meridian-pgproxy: no server connection became free within pool.query_wait_timeout ({waited_ms} ms): all {pool_size} connections of the pool are in use"
            ),
            NoPrimary { held_ms } => {
                format!("no primary available: failover in progress (held {held_ms} ms)")
            }
            BackendLost { in_tx: true } => {
                "server connection lost: the transaction was rolled back and may be retried".into()
            }
            BackendLost { in_tx: false } => "server connection lost while running the statement; it may or may not have been applied".into(),
            TransactionLost => "current transaction is aborted (its server connection was lost), commands ignored until end of transaction block".into(),
            InvalidSetting { message } => message.clone(),
            ReadOnlySetting { name } => {
                format!("parameter \"{name}\" cannot be changed: it is set by the proxy")
            }
            ShuttingDown => "terminating connection: meridian-pgproxy is shutting down".into(),
        }
    }

    /// The `ErrorResponse` carrying this error.
    pub fn to_frame(&self, severity: Severity) -> Frame {
        wire::error_response(severity.as_str(), self.sqlstate().as_str(), &self.message())
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.sqlstate(), self.message())
    }
}

impl std::error::Error for ProxyError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_five_characters_and_labels_are_fixed() {
        let all = [
            ProxyError::InvalidStartupPacket,
            ProxyError::UnsupportedProtocol { major: 9, minor: 0 },
            ProxyError::TooManyClients,
            ProxyError::LoginTimeout,
            ProxyError::PasswordFailed { user: "u".into() },
            ProxyError::InvalidMessage("Parse"),
            ProxyError::DuplicatePreparedStatement { name: "s".into() },
            ProxyError::NoPrimary { held_ms: 3 },
            ProxyError::BackendLost { in_tx: true },
            ProxyError::TransactionLost,
            ProxyError::ShuttingDown,
        ];
        for e in &all {
            assert_eq!(e.sqlstate().as_str().len(), 5, "{e:?}");
            assert!(e
                .label()
                .chars()
                .all(|c| c.is_ascii_lowercase() || c == '_'));
        }
        let f = ProxyError::TooManyClients.to_frame(Severity::Fatal);
        let (sev, code, msg) = wire::error_fields(&f);
        assert_eq!((sev.as_str(), code.as_str()), ("FATAL", "53300"));
        assert_eq!(msg, "sorry, too many clients already");
    }

    #[test]
    fn the_no_backend_message_names_no_address() {
        let m = ProxyError::NoBackend.message();
        assert!(
            !m.contains(':') || m.starts_with("meridian-pgproxy:"),
            "{m}"
        );
        assert!(!m.chars().any(|c| c.is_ascii_digit()), "{m}");
    }
}
