//! Message framing for the Postgres protocol 3.0, in both directions.
//!
//! The proxy forwards most messages without decoding them: a [`Frame`] is the
//! tag plus the whole message as `Bytes`, cut out of the read buffer without
//! copying. Only the few messages the proxy must look into (Query, Parse, Bind,
//! Describe, Close, ReadyForQuery, ErrorResponse) are decoded, with pgwire's and
//! postgres-protocol's codecs. Framing enforces a maximum message size so a
//! hostile length field cannot make the proxy allocate without bound.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Protocol version 3.0 as sent in the startup packet.
pub const PROTOCOL_3_0: i32 = 196_608;
/// `SSLRequest` code.
pub const SSL_REQUEST: i32 = 80_877_103;
/// `GSSENCRequest` code.
pub const GSSENC_REQUEST: i32 = 80_877_104;
/// `CancelRequest` code.
pub const CANCEL_REQUEST: i32 = 80_877_102;

/// A framing error: the peer sent something that is not a protocol message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("message length {0} is invalid")]
    BadLength(i64),
    #[error("message of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("malformed {0} message")]
    Malformed(&'static str),
}

/// One complete tagged message: `raw` holds tag, length and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub raw: Bytes,
}

impl Frame {
    /// The message body (after tag and length).
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }

    /// Builds a frame from a tag and body.
    pub fn new(tag: u8, body: &[u8]) -> Frame {
        let mut b = BytesMut::with_capacity(5 + body.len());
        b.put_u8(tag);
        b.put_i32((body.len() + 4) as i32);
        b.put_slice(body);
        Frame {
            tag,
            raw: b.freeze(),
        }
    }
}

/// The most a read buffer is grown ahead of the bytes that have arrived, beyond
/// doubling what is already buffered: a long message's buffer grows as its bytes
/// come, so an announced length costs nothing until the bytes are sent.
pub const READ_AHEAD: usize = 64 * 1024;

/// Cuts one tagged message out of `buf` if it is complete.
///
/// Returns `Ok(None)` when more bytes are needed; a length below 4 or above
/// `max` is an error (the connection cannot be resynchronised after it). The
/// announced length is never reserved up front: an incomplete message grows the
/// buffer by at most `max(READ_AHEAD, bytes buffered)`, so memory follows the bytes
/// received (geometric growth keeps copying linear) rather than the length field.
pub fn try_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(WireError::BadLength(len as i64));
    }
    let total = len as usize + 1;
    if total > max {
        return Err(WireError::TooLarge { len: total, max });
    }
    if buf.len() < total {
        let missing = total - buf.len();
        buf.reserve(missing.min(READ_AHEAD.max(buf.len())));
        return Ok(None);
    }
    let tag = buf[0];
    let raw = buf.split_to(total).freeze();
    Ok(Some(Frame { tag, raw }))
}

/// Buffers above this capacity are given back once they hold little: a 100 MB message
/// must not pin 100 MB to a pooled connection or a session for the rest of its life.
pub const SHRINK_ABOVE: usize = 1024 * 1024;

/// Replaces `buf` by a `base`-sized one holding the same bytes when it grew past
/// [`SHRINK_ABOVE`] and now holds less than a quarter of that.
pub fn shrink_after_large(buf: &mut BytesMut, base: usize) {
    if buf.capacity() > SHRINK_ABOVE && buf.len() < SHRINK_ABOVE / 4 {
        let mut fresh = BytesMut::with_capacity(base.max(buf.len()));
        fresh.extend_from_slice(buf);
        *buf = fresh;
    }
}

/// An untagged packet sent before the session starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartupPacket {
    SslRequest,
    GssEncRequest,
    Cancel {
        pid: i32,
        secret: i32,
    },
    Startup {
        version: i32,
        params: Vec<(String, String)>,
    },
}

/// Cuts the startup-phase packet (length-prefixed, untagged) out of `buf`.
pub fn try_startup(buf: &mut BytesMut, max: usize) -> Result<Option<StartupPacket>, WireError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(WireError::BadLength(len as i64));
    }
    let len = len as usize;
    if len > max {
        return Err(WireError::TooLarge { len, max });
    }
    if buf.len() < len {
        return Ok(None);
    }
    let mut pkt = buf.split_to(len);
    pkt.advance(4);
    let code = pkt.get_i32();
    Ok(Some(match code {
        SSL_REQUEST => StartupPacket::SslRequest,
        GSSENC_REQUEST => StartupPacket::GssEncRequest,
        CANCEL_REQUEST => {
            if pkt.len() != 8 {
                return Err(WireError::Malformed("CancelRequest"));
            }
            StartupPacket::Cancel {
                pid: pkt.get_i32(),
                secret: pkt.get_i32(),
            }
        }
        version => StartupPacket::Startup {
            version,
            params: parse_startup_params(&pkt)?,
        },
    }))
}

fn parse_startup_params(mut body: &[u8]) -> Result<Vec<(String, String)>, WireError> {
    let mut params = Vec::new();
    loop {
        let key = read_cstr(&mut body).ok_or(WireError::Malformed("StartupMessage"))?;
        if key.is_empty() {
            break;
        }
        let value = read_cstr(&mut body).ok_or(WireError::Malformed("StartupMessage"))?;
        params.push((key.to_owned(), value.to_owned()));
    }
    Ok(params)
}

/// Reads a NUL-terminated UTF-8 string and advances past it.
pub fn read_cstr<'a>(buf: &mut &'a [u8]) -> Option<&'a str> {
    let end = buf.iter().position(|&b| b == 0)?;
    let s = std::str::from_utf8(&buf[..end]).ok()?;
    *buf = &buf[end + 1..];
    Some(s)
}

/// The text of a simple `Query` message.
pub fn query_text(frame: &Frame) -> Result<&str, WireError> {
    let mut body = frame.body();
    read_cstr(&mut body).ok_or(WireError::Malformed("Query"))
}

/// The fields of a `Parse` message the proxy needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseMsg<'a> {
    pub name: &'a str,
    pub query: &'a str,
    /// The parameter type section, verbatim (count + OIDs).
    pub param_types: &'a [u8],
}

pub fn parse_msg(frame: &Frame) -> Result<ParseMsg<'_>, WireError> {
    let mut body = frame.body();
    let name = read_cstr(&mut body).ok_or(WireError::Malformed("Parse"))?;
    let query = read_cstr(&mut body).ok_or(WireError::Malformed("Parse"))?;
    if body.len() < 2 {
        return Err(WireError::Malformed("Parse"));
    }
    let n = i16::from_be_bytes([body[0], body[1]]);
    if n < 0 || body.len() != 2 + 4 * n as usize {
        return Err(WireError::Malformed("Parse"));
    }
    Ok(ParseMsg {
        name,
        query,
        param_types: body,
    })
}

/// Encodes a `Parse` message.
pub fn encode_parse(name: &str, query: &str, param_types: &[u8]) -> Frame {
    let mut body = Vec::with_capacity(name.len() + query.len() + 2 + param_types.len());
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    body.extend_from_slice(query.as_bytes());
    body.push(0);
    body.extend_from_slice(param_types);
    Frame::new(b'P', &body)
}

/// Splits a `Bind` message into (portal, statement, rest of the body).
/// The row limit of an Execute message (0: all rows); `None` if malformed.
pub fn execute_max_rows(frame: &Frame) -> Option<i32> {
    let mut body = frame.body();
    read_cstr(&mut body)?;
    Some(i32::from_be_bytes(body.get(..4)?.try_into().ok()?))
}

pub fn bind_names(frame: &Frame) -> Result<(&str, &str, &[u8]), WireError> {
    let mut body = frame.body();
    let portal = read_cstr(&mut body).ok_or(WireError::Malformed("Bind"))?;
    let stmt = read_cstr(&mut body).ok_or(WireError::Malformed("Bind"))?;
    Ok((portal, stmt, body))
}

/// Re-encodes a `Bind` with another statement name, parameters untouched.
pub fn rename_bind(frame: &Frame, new_stmt: &str) -> Result<Frame, WireError> {
    let (portal, _, rest) = bind_names(frame)?;
    let mut body = Vec::with_capacity(portal.len() + new_stmt.len() + 2 + rest.len());
    body.extend_from_slice(portal.as_bytes());
    body.push(0);
    body.extend_from_slice(new_stmt.as_bytes());
    body.push(0);
    body.extend_from_slice(rest);
    Ok(Frame::new(b'B', &body))
}

/// `Describe` or `Close` target: `S`tatement or `P`ortal and its name.
pub fn target_of(frame: &Frame) -> Result<(u8, &str), WireError> {
    let what = if frame.tag == b'D' {
        "Describe"
    } else {
        "Close"
    };
    let body = frame.body();
    let (&kind, mut rest) = body.split_first().ok_or(WireError::Malformed(what))?;
    if kind != b'S' && kind != b'P' {
        return Err(WireError::Malformed(what));
    }
    let name = read_cstr(&mut rest).ok_or(WireError::Malformed(what))?;
    Ok((kind, name))
}

/// Builds a `Describe`/`Close` with another name.
pub fn encode_target(tag: u8, kind: u8, name: &str) -> Frame {
    let mut body = Vec::with_capacity(name.len() + 2);
    body.push(kind);
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    Frame::new(tag, &body)
}

/// Builds a simple `Query` message.
pub fn encode_query(sql: &str) -> Frame {
    let mut body = Vec::with_capacity(sql.len() + 1);
    body.extend_from_slice(sql.as_bytes());
    body.push(0);
    Frame::new(b'Q', &body)
}

/// Transaction status byte of a `ReadyForQuery`.
pub fn ready_status(frame: &Frame) -> u8 {
    frame.body().first().copied().unwrap_or(b'I')
}

/// Builds a `ReadyForQuery`.
pub fn ready_for_query(status: u8) -> Frame {
    Frame::new(b'Z', &[status])
}

/// Builds a `CommandComplete`.
pub fn command_complete(tag: &str) -> Frame {
    let mut body = tag.as_bytes().to_vec();
    body.push(0);
    Frame::new(b'C', &body)
}

/// Severity and SQLSTATE of an `ErrorResponse`/`NoticeResponse`.
pub fn error_fields(frame: &Frame) -> (String, String, String) {
    let mut severity = String::new();
    let mut code = String::new();
    let mut message = String::new();
    let mut body = frame.body();
    while let Some((&field, rest)) = body.split_first() {
        if field == 0 {
            break;
        }
        body = rest;
        let Some(value) = read_cstr(&mut body) else {
            break;
        };
        match field {
            b'V' => severity = value.to_owned(),
            b'S' if severity.is_empty() => severity = value.to_owned(),
            b'C' => code = value.to_owned(),
            b'M' => message = value.to_owned(),
            _ => {}
        }
    }
    (severity, code, message)
}

/// Builds an `ErrorResponse` (or a `NoticeResponse` with tag `N`).
pub fn error_response(severity: &str, code: &str, message: &str) -> Frame {
    let mut body = Vec::with_capacity(message.len() + 32);
    for (field, value) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ] {
        body.push(field);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    Frame::new(b'E', &body)
}

/// Builds a one-column `RowDescription` of type `text` in text format.
pub fn row_description_text(column: &str) -> Frame {
    let mut body = Vec::with_capacity(column.len() + 21);
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(column.as_bytes());
    body.push(0);
    body.extend_from_slice(&0i32.to_be_bytes()); // table oid
    body.extend_from_slice(&0i16.to_be_bytes()); // attribute number
    body.extend_from_slice(&25i32.to_be_bytes()); // type oid: text
    body.extend_from_slice(&(-1i16).to_be_bytes()); // type length
    body.extend_from_slice(&(-1i32).to_be_bytes()); // type modifier
    body.extend_from_slice(&0i16.to_be_bytes()); // format: text
    Frame::new(b'T', &body)
}

/// Builds a one-column `DataRow` holding `value` as text.
pub fn data_row_text(value: &str) -> Frame {
    let mut body = Vec::with_capacity(value.len() + 6);
    body.extend_from_slice(&1i16.to_be_bytes());
    body.extend_from_slice(&(value.len() as i32).to_be_bytes());
    body.extend_from_slice(value.as_bytes());
    Frame::new(b'D', &body)
}

/// Builds a `ParameterStatus`.
pub fn parameter_status(name: &str, value: &str) -> Frame {
    let mut body = Vec::with_capacity(name.len() + value.len() + 2);
    body.extend_from_slice(name.as_bytes());
    body.push(0);
    body.extend_from_slice(value.as_bytes());
    body.push(0);
    Frame::new(b'S', &body)
}

/// Builds a `BackendKeyData`.
pub fn backend_key_data(pid: i32, secret: i32) -> Frame {
    let mut body = [0u8; 8];
    body[..4].copy_from_slice(&pid.to_be_bytes());
    body[4..].copy_from_slice(&secret.to_be_bytes());
    Frame::new(b'K', &body)
}

/// Builds a `NegotiateProtocolVersion` naming the newest minor version we speak.
pub fn negotiate_protocol_version(unsupported_options: &[&str]) -> Frame {
    let mut body = Vec::new();
    body.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
    body.extend_from_slice(&(unsupported_options.len() as i32).to_be_bytes());
    for o in unsupported_options {
        body.extend_from_slice(o.as_bytes());
        body.push(0);
    }
    Frame::new(b'v', &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frame_round_trip_and_partial() {
        let f = encode_query("SELECT 1");
        let mut buf = BytesMut::new();
        for (i, b) in f.raw.iter().enumerate() {
            assert_eq!(try_frame(&mut buf, 1 << 20).unwrap(), None, "at byte {i}");
            buf.put_u8(*b);
        }
        let got = try_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!(got, f);
        assert_eq!(query_text(&got).unwrap(), "SELECT 1");
        assert!(buf.is_empty());
    }

    #[test]
    fn a_grown_buffer_is_shrunk_once_it_holds_little_keeping_its_bytes() {
        let mut buf = BytesMut::with_capacity(8 * SHRINK_ABOVE);
        buf.extend_from_slice(&[7u8; 1000]);
        shrink_after_large(&mut buf, 8192);
        assert!(buf.capacity() < SHRINK_ABOVE, "{}", buf.capacity());
        assert_eq!(&buf[..], &[7u8; 1000][..]);
        // Still full of data: kept as it is.
        let mut full = BytesMut::with_capacity(8 * SHRINK_ABOVE);
        full.extend_from_slice(&vec![1u8; SHRINK_ABOVE]);
        shrink_after_large(&mut full, 8192);
        assert!(full.capacity() >= SHRINK_ABOVE);
        assert_eq!(full.len(), SHRINK_ABOVE);
    }

    #[test]
    fn oversized_and_negative_lengths_are_errors() {
        let mut buf = BytesMut::from(&[b'Q', 0x7f, 0xff, 0xff, 0xff][..]);
        assert!(matches!(
            try_frame(&mut buf, 1024),
            Err(WireError::TooLarge { .. })
        ));
        let mut buf = BytesMut::from(&[b'Q', 0, 0, 0, 2][..]);
        assert_eq!(try_frame(&mut buf, 1024), Err(WireError::BadLength(2)));
    }

    #[test]
    fn an_announced_length_is_not_reserved_before_its_bytes_arrive() {
        // A 1 GiB message announced, 100 bytes sent: the buffer must not take 1 GiB.
        let len = (1u32 << 30) - 64;
        let mut buf = BytesMut::new();
        buf.put_u8(b'Q');
        buf.put_u32(len);
        buf.put_slice(&[b'x'; 100]);
        assert_eq!(try_frame(&mut buf, 1 << 30).unwrap(), None);
        assert!(buf.capacity() <= 2 * READ_AHEAD, "{}", buf.capacity());
        // Growing as bytes arrive still cuts the whole message out in the end.
        let body = vec![b'y'; 3 * READ_AHEAD];
        let f = Frame::new(b'd', &body);
        let mut buf = BytesMut::new();
        let mut got = None;
        for chunk in f.raw.chunks(1000) {
            assert!(got.is_none());
            buf.put_slice(chunk);
            got = try_frame(&mut buf, 1 << 20).unwrap();
            assert!(buf.capacity() <= 4 * buf.len().max(READ_AHEAD));
        }
        assert_eq!(got, Some(f));
    }

    #[test]
    fn startup_packets() {
        let mut buf = BytesMut::new();
        buf.put_i32(8);
        buf.put_i32(SSL_REQUEST);
        assert_eq!(
            try_startup(&mut buf, 10_000).unwrap(),
            Some(StartupPacket::SslRequest)
        );
        let mut body = BytesMut::new();
        body.put_i32(PROTOCOL_3_0);
        body.put_slice(b"user\0app\0database\0db\0\0");
        let mut buf = BytesMut::new();
        buf.put_i32(body.len() as i32 + 4);
        buf.put_slice(&body);
        assert_eq!(
            try_startup(&mut buf, 10_000).unwrap(),
            Some(StartupPacket::Startup {
                version: PROTOCOL_3_0,
                params: vec![
                    ("user".into(), "app".into()),
                    ("database".into(), "db".into())
                ]
            })
        );
        let mut buf = BytesMut::new();
        buf.put_i32(100_000);
        assert!(matches!(
            try_startup(&mut buf, 10_000),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn parse_bind_rename() {
        let p = encode_parse("s1", "SELECT $1", &[0, 1, 0, 0, 0, 23]);
        let m = parse_msg(&p).unwrap();
        assert_eq!((m.name, m.query), ("s1", "SELECT $1"));
        let b = Frame::new(b'B', b"portal\0s1\0\0\0\0\0\0\0");
        let r = rename_bind(&b, "mrd_1").unwrap();
        assert_eq!(bind_names(&r).unwrap().1, "mrd_1");
        assert_eq!(bind_names(&r).unwrap().2, bind_names(&b).unwrap().2);
    }

    #[test]
    fn error_fields_round_trip() {
        let e = error_response("ERROR", "28P01", "password authentication failed");
        let (sev, code, msg) = error_fields(&e);
        assert_eq!((sev.as_str(), code.as_str()), ("ERROR", "28P01"));
        assert_eq!(msg, "password authentication failed");
    }

    proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = BytesMut::from(&data[..]);
            while let Ok(Some(f)) = try_frame(&mut buf, 4096) {
                let _ = query_text(&f);
                let _ = parse_msg(&f);
                let _ = bind_names(&f);
                let _ = target_of(&f);
                let _ = error_fields(&f);
            }
            let mut buf = BytesMut::from(&data[..]);
            let _ = try_startup(&mut buf, 4096);
        }

        #[test]
        fn split_frames_reassemble(sqls in proptest::collection::vec("[a-z ]{0,40}", 1..8), cut in 0usize..400) {
            let mut all = BytesMut::new();
            for s in &sqls { all.put_slice(&encode_query(s).raw); }
            let cut = cut.min(all.len());
            let mut buf = BytesMut::from(&all[..cut]);
            let mut got = Vec::new();
            while let Some(f) = try_frame(&mut buf, 4096).unwrap() { got.push(f); }
            buf.put_slice(&all[cut..]);
            while let Some(f) = try_frame(&mut buf, 4096).unwrap() { got.push(f); }
            let texts: Vec<_> = got.iter().map(|f| query_text(f).unwrap().to_owned()).collect();
            prop_assert_eq!(texts, sqls);
        }
    }
}
