//! The PostgreSQL protocol as the session sees it: client messages decoded once into a
//! typed enum ([`frontend`]), and the few facts read from server messages
//! ([`backend`]). Framing (cutting messages out of a byte stream) and the encoders of
//! messages the proxy synthesizes towards clients live in [`crate::wire`].

pub mod backend;
pub mod frontend;
