//! The few facts about backend (server → client) messages the session needs, read from
//! the frame on demand: the message kind by tag, the transaction status of a
//! `ReadyForQuery` ([`TxStatus`]), the severity and SQLSTATE of an `ErrorResponse`, a
//! `ParameterStatus` pair, a `NotificationResponse`'s process id, a `CommandComplete` tag.
//! Result rows (`DataRow`, `CopyData`) are never decoded: they pass through as frames.

use crate::wire::{self, Frame};

/// Transaction status of a `ReadyForQuery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TxStatus {
    /// `I`: not in a transaction block.
    Idle,
    /// `T`: in a transaction block.
    InTransaction,
    /// `E`: in a failed transaction block.
    Failed,
}

impl TxStatus {
    pub fn byte(self) -> u8 {
        match self {
            TxStatus::Idle => b'I',
            TxStatus::InTransaction => b'T',
            TxStatus::Failed => b'E',
        }
    }

    pub fn from_byte(b: u8) -> Option<TxStatus> {
        match b {
            b'I' => Some(TxStatus::Idle),
            b'T' => Some(TxStatus::InTransaction),
            b'E' => Some(TxStatus::Failed),
            _ => None,
        }
    }
}

/// What a backend message is, by its tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    ParseComplete,
    BindComplete,
    CloseComplete,
    ParameterDescription,
    RowDescription,
    NoData,
    DataRow,
    CommandComplete,
    EmptyQuery,
    PortalSuspended,
    Error,
    Notice,
    ParameterStatus,
    Notification,
    ReadyForQuery,
    CopyInResponse,
    CopyOutResponse,
    CopyBothResponse,
    CopyData,
    CopyDone,
    FunctionCallResponse,
    /// Anything else (`BackendKeyData`, authentication, … mid-session: a confused backend).
    Other(u8),
}

impl BackendKind {
    pub fn of(frame: &Frame) -> BackendKind {
        match frame.tag {
            b'1' => BackendKind::ParseComplete,
            b'2' => BackendKind::BindComplete,
            b'3' => BackendKind::CloseComplete,
            b't' => BackendKind::ParameterDescription,
            b'T' => BackendKind::RowDescription,
            b'n' => BackendKind::NoData,
            b'D' => BackendKind::DataRow,
            b'C' => BackendKind::CommandComplete,
            b'I' => BackendKind::EmptyQuery,
            b's' => BackendKind::PortalSuspended,
            b'E' => BackendKind::Error,
            b'N' => BackendKind::Notice,
            b'S' => BackendKind::ParameterStatus,
            b'A' => BackendKind::Notification,
            b'Z' => BackendKind::ReadyForQuery,
            b'G' => BackendKind::CopyInResponse,
            b'H' => BackendKind::CopyOutResponse,
            b'W' => BackendKind::CopyBothResponse,
            b'd' => BackendKind::CopyData,
            b'c' => BackendKind::CopyDone,
            b'V' => BackendKind::FunctionCallResponse,
            other => BackendKind::Other(other),
        }
    }
}

/// The status of a `ReadyForQuery` (a malformed one reads as idle).
pub fn ready_status(frame: &Frame) -> TxStatus {
    frame
        .body()
        .first()
        .copied()
        .and_then(TxStatus::from_byte)
        .unwrap_or(TxStatus::Idle)
}

/// How severe an `ErrorResponse` is (its non-localized `V` field, else `S`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSeverity {
    Error,
    /// `FATAL` or `PANIC`: the server closes the connection after it.
    Fatal,
}

/// The fields of an `ErrorResponse` the session acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorInfo {
    pub severity: ErrorSeverity,
    pub code: String,
    pub message: String,
}

/// Reads the severity, SQLSTATE and message of an `ErrorResponse`.
pub fn error_info(frame: &Frame) -> ErrorInfo {
    let (severity, code, message) = wire::error_fields(frame);
    ErrorInfo {
        severity: if severity == "FATAL" || severity == "PANIC" {
            ErrorSeverity::Fatal
        } else {
            ErrorSeverity::Error
        },
        code,
        message,
    }
}

/// The same `ErrorResponse` with severity `ERROR` instead of `FATAL`/`PANIC`: the server
/// ended its backend, but the client's session goes on (on another backend).
pub fn downgrade_to_error(frame: &Frame) -> Frame {
    let mut body = Vec::with_capacity(frame.body().len());
    let mut rest = frame.body();
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            break;
        }
        let Some(end) = tail.iter().position(|&b| b == 0) else {
            return frame.clone();
        };
        let value = &tail[..end];
        body.push(field);
        if (field == b'S' || field == b'V') && (value == b"FATAL" || value == b"PANIC") {
            body.extend_from_slice(b"ERROR");
        } else {
            body.extend_from_slice(value);
        }
        body.push(0);
        rest = &tail[end + 1..];
    }
    body.push(0);
    Frame::new(b'E', &body)
}

/// The name and value of a `ParameterStatus` (bytes; names are ASCII).
pub fn parameter_status(frame: &Frame) -> Option<(&[u8], &[u8])> {
    let body = frame.body();
    let n = body.iter().position(|&b| b == 0)?;
    let rest = &body[n + 1..];
    let v = rest.iter().position(|&b| b == 0)?;
    Some((&body[..n], &rest[..v]))
}

/// The sending backend's process id of a `NotificationResponse`.
pub fn notification_pid(frame: &Frame) -> Option<i32> {
    let b = frame.body().get(..4)?;
    Some(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// The same `NotificationResponse` naming process `pid`.
pub fn with_notification_pid(frame: &Frame, pid: i32) -> Frame {
    let mut body = frame.body().to_vec();
    if body.len() >= 4 {
        body[..4].copy_from_slice(&pid.to_be_bytes());
    }
    Frame::new(b'A', &body)
}

/// The tag of a `CommandComplete` (`INSERT 0 1`, `SELECT 3`, ...).
pub fn command_tag(frame: &Frame) -> &[u8] {
    let body = frame.body();
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    &body[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fatal_error_downgrades_with_its_code_and_message() {
        let f = wire::error_response(
            "FATAL",
            "57P01",
            "terminating connection due to administrator command",
        );
        let info = error_info(&f);
        assert_eq!(info.severity, ErrorSeverity::Fatal);
        let d = downgrade_to_error(&f);
        let info = error_info(&d);
        assert_eq!(info.severity, ErrorSeverity::Error);
        assert_eq!(info.code, "57P01");
        assert_eq!(
            info.message,
            "terminating connection due to administrator command"
        );
    }

    #[test]
    fn notification_pid_is_rewritten() {
        let mut body = 4242i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"chan\0payload\0");
        let f = Frame::new(b'A', &body);
        assert_eq!(notification_pid(&f), Some(4242));
        let g = with_notification_pid(&f, 7);
        assert_eq!(notification_pid(&g), Some(7));
        assert_eq!(&g.body()[4..], b"chan\0payload\0");
    }

    #[test]
    fn parameter_status_and_tags() {
        let f = wire::parameter_status("client_encoding", "UTF8");
        assert_eq!(
            parameter_status(&f),
            Some((&b"client_encoding"[..], &b"UTF8"[..]))
        );
        assert_eq!(
            command_tag(&wire::command_complete("INSERT 0 1")),
            b"INSERT 0 1"
        );
        assert_eq!(ready_status(&wire::ready_for_query(b'E')), TxStatus::Failed);
    }
}
