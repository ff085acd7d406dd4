//! Frontend (client → server) messages, decoded once into [`FrontendMsg`].
//!
//! Names and query texts stay bytes ([`Bytes`] slices of the frame, no copy): PostgreSQL
//! takes them in the client's encoding, which need not be UTF-8, and a lossy decode would
//! rewrite them. Decoding is at most as strict as PostgreSQL's own: a message of a known
//! type whose body the proxy cannot decode becomes [`FrontendMsg::Malformed`], which the
//! session forwards so that the server answers it with its own error (as it would
//! directly) instead of the proxy closing the connection. Parameter values and result
//! formats of a `Bind` are never decoded.

use bytes::Bytes;

use crate::wire::Frame;

/// What a `Describe` or `Close` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    Statement,
    Portal,
}

impl Target {
    pub fn byte(self) -> u8 {
        match self {
            Target::Statement => b'S',
            Target::Portal => b'P',
        }
    }
}

/// `Parse`: a statement name, its text and the declared parameter types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parse {
    pub name: Bytes,
    pub query: Bytes,
    /// The parameter type section verbatim: an unsigned 16-bit count and the OIDs.
    pub param_types: Bytes,
}

/// `Bind`: portal and statement names; the rest of the body stays undecoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bind {
    pub portal: Bytes,
    pub statement: Bytes,
    /// Parameter formats, values and result formats, verbatim.
    pub rest: Bytes,
}

/// A client message as the session sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrontendMsg {
    /// Simple query: the text without its terminating NUL.
    Query(Bytes),
    Parse(Parse),
    Bind(Bind),
    Describe(Target, Bytes),
    Execute {
        portal: Bytes,
        max_rows: i32,
    },
    Close(Target, Bytes),
    Sync,
    Flush,
    CopyData,
    CopyDone,
    CopyFail,
    FunctionCall,
    Terminate,
    /// A frontend message type whose body does not decode: the server answers it.
    Malformed(u8),
    /// Not a frontend message type at all.
    Unknown(u8),
}

impl FrontendMsg {
    /// Decodes `frame` (never fails: see [`FrontendMsg::Malformed`]).
    pub fn decode(frame: &Frame) -> FrontendMsg {
        let tag = frame.tag;
        let decoded = match tag {
            b'Q' => Reader::new(frame).cstr().map(FrontendMsg::Query),
            b'P' => decode_parse(frame),
            b'B' => {
                let mut r = Reader::new(frame);
                (|| {
                    let portal = r.cstr()?;
                    let statement = r.cstr()?;
                    Some(FrontendMsg::Bind(Bind {
                        portal,
                        statement,
                        rest: r.rest(),
                    }))
                })()
            }
            b'D' | b'C' => {
                let mut r = Reader::new(frame);
                (|| {
                    let target = match r.byte()? {
                        b'S' => Target::Statement,
                        b'P' => Target::Portal,
                        _ => return None,
                    };
                    let name = r.cstr()?;
                    r.end()?;
                    Some(if tag == b'D' {
                        FrontendMsg::Describe(target, name)
                    } else {
                        FrontendMsg::Close(target, name)
                    })
                })()
            }
            b'E' => {
                let mut r = Reader::new(frame);
                (|| {
                    let portal = r.cstr()?;
                    let max_rows = r.i32()?;
                    r.end()?;
                    Some(FrontendMsg::Execute { portal, max_rows })
                })()
            }
            b'S' => Some(FrontendMsg::Sync),
            b'H' => Some(FrontendMsg::Flush),
            b'd' => Some(FrontendMsg::CopyData),
            b'c' => Some(FrontendMsg::CopyDone),
            b'f' => Some(FrontendMsg::CopyFail),
            b'F' => Some(FrontendMsg::FunctionCall),
            b'X' => Some(FrontendMsg::Terminate),
            other => return FrontendMsg::Unknown(other),
        };
        decoded.unwrap_or(FrontendMsg::Malformed(tag))
    }
}

fn decode_parse(frame: &Frame) -> Option<FrontendMsg> {
    let mut r = Reader::new(frame);
    let name = r.cstr()?;
    let query = r.cstr()?;
    let start = r.pos;
    // PostgreSQL reads the count as an unsigned 16-bit number (up to 65535 parameters).
    let count = r.u16()? as usize;
    for _ in 0..count {
        r.i32()?;
    }
    r.end()?;
    Some(FrontendMsg::Parse(Parse {
        name,
        query,
        param_types: frame.raw.slice(start..r.pos),
    }))
}

/// A cursor over a frame's body that hands out zero-copy slices.
struct Reader<'a> {
    frame: &'a Frame,
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(frame: &'a Frame) -> Self {
        Reader { frame, pos: 5 }
    }

    fn remaining(&self) -> &[u8] {
        self.frame.raw.get(self.pos..).unwrap_or(&[])
    }

    fn cstr(&mut self) -> Option<Bytes> {
        let len = self.remaining().iter().position(|&b| b == 0)?;
        let s = self.frame.raw.slice(self.pos..self.pos + len);
        self.pos += len + 1;
        Some(s)
    }

    fn byte(&mut self) -> Option<u8> {
        let b = *self.remaining().first()?;
        self.pos += 1;
        Some(b)
    }

    fn u16(&mut self) -> Option<u16> {
        let b = self.remaining().get(..2)?;
        let v = u16::from_be_bytes([b[0], b[1]]);
        self.pos += 2;
        Some(v)
    }

    fn i32(&mut self) -> Option<i32> {
        let b = self.remaining().get(..4)?;
        let v = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        self.pos += 4;
        Some(v)
    }

    fn rest(&mut self) -> Bytes {
        let s = self.frame.raw.slice(self.pos.min(self.frame.raw.len())..);
        self.pos = self.frame.raw.len();
        s
    }

    fn end(&self) -> Option<()> {
        self.remaining().is_empty().then_some(())
    }
}

/// Builds a `Parse` message.
pub fn parse(name: &[u8], query: &[u8], param_types: &[u8]) -> Frame {
    let mut body = Vec::with_capacity(name.len() + query.len() + 2 + param_types.len());
    body.extend_from_slice(name);
    body.push(0);
    body.extend_from_slice(query);
    body.push(0);
    body.extend_from_slice(param_types);
    Frame::new(b'P', &body)
}

/// Builds a `Bind` naming `statement`, with `b`'s portal and parameters.
pub fn bind_renamed(b: &Bind, statement: &[u8]) -> Frame {
    let mut body = Vec::with_capacity(b.portal.len() + statement.len() + 2 + b.rest.len());
    body.extend_from_slice(&b.portal);
    body.push(0);
    body.extend_from_slice(statement);
    body.push(0);
    body.extend_from_slice(&b.rest);
    Frame::new(b'B', &body)
}

/// Builds a `Describe` (`tag` `D`) or `Close` (`C`) of `target` `name`.
pub fn target_msg(tag: u8, target: Target, name: &[u8]) -> Frame {
    let mut body = Vec::with_capacity(name.len() + 2);
    body.push(target.byte());
    body.extend_from_slice(name);
    body.push(0);
    Frame::new(tag, &body)
}

/// Builds an `Execute` of `portal` for up to `max_rows` rows (0: all).
pub fn execute(portal: &[u8], max_rows: i32) -> Frame {
    let mut body = Vec::with_capacity(portal.len() + 5);
    body.extend_from_slice(portal);
    body.push(0);
    body.extend_from_slice(&max_rows.to_be_bytes());
    Frame::new(b'E', &body)
}

/// Builds a `Sync`.
pub fn sync() -> Frame {
    Frame::new(b'S', &[])
}

/// Builds a simple `Query`.
pub fn query(sql: &[u8]) -> Frame {
    let mut body = Vec::with_capacity(sql.len() + 1);
    body.extend_from_slice(sql);
    body.push(0);
    Frame::new(b'Q', &body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parse_keeps_bytes_and_reads_the_count_unsigned() {
        // 40,000 parameters: legal (up to 65535), negative as an i16.
        let mut types = (40_000u16).to_be_bytes().to_vec();
        for _ in 0..40_000 {
            types.extend_from_slice(&23i32.to_be_bytes());
        }
        let latin9 = b"SELECT '\xa4'";
        let f = parse(b"s1", latin9, &types);
        match FrontendMsg::decode(&f) {
            FrontendMsg::Parse(p) => {
                assert_eq!(&p.name[..], b"s1");
                assert_eq!(&p.query[..], latin9);
                assert_eq!(p.param_types.len(), 2 + 4 * 40_000);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn short_or_long_bodies_are_malformed_not_errors() {
        // Declares 2 parameters, carries 1.
        let f = Frame::new(b'P', b"s\0SELECT $1\0\0\x02\0\0\0\x17");
        assert_eq!(FrontendMsg::decode(&f), FrontendMsg::Malformed(b'P'));
        let f = Frame::new(b'D', b"X\0");
        assert_eq!(FrontendMsg::decode(&f), FrontendMsg::Malformed(b'D'));
        let f = Frame::new(b'Q', b"no terminator");
        assert_eq!(FrontendMsg::decode(&f), FrontendMsg::Malformed(b'Q'));
        assert_eq!(
            FrontendMsg::decode(&Frame::new(b'z', b"")),
            FrontendMsg::Unknown(b'z')
        );
    }

    #[test]
    fn builders_round_trip() {
        let b = Bind {
            portal: Bytes::from_static(b"p"),
            statement: Bytes::from_static(b"s"),
            rest: Bytes::from_static(b"\0\0\0\0\0\0"),
        };
        match FrontendMsg::decode(&bind_renamed(&b, b"mrd_1")) {
            FrontendMsg::Bind(got) => {
                assert_eq!(&got.statement[..], b"mrd_1");
                assert_eq!(got.rest, b.rest);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            FrontendMsg::decode(&target_msg(b'C', Target::Statement, b"x")),
            FrontendMsg::Close(Target::Statement, Bytes::from_static(b"x"))
        );
        assert_eq!(
            FrontendMsg::decode(&execute(b"", 10)),
            FrontendMsg::Execute {
                portal: Bytes::new(),
                max_rows: 10
            }
        );
    }

    proptest! {
        #[test]
        fn any_body_decodes_without_panicking(tag in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = FrontendMsg::decode(&Frame::new(tag, &body));
        }
    }
}
