//! The cluster's fencing token.
//!
//! An [`Epoch`] is bumped by the active coordinator before every promotion and
//! stored in etcd (`epoch`), in the `leader` record, in every command sent to an
//! agent and in the promoted node itself. Anything carrying an epoch lower than the
//! current one is stale and must be refused; this module only provides the
//! comparison, the refusing is done where the message is handled.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A strictly increasing fencing token (serialised as a JSON number).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Epoch(pub u64);

impl Epoch {
    /// The epoch before any leader was ever elected.
    pub const ZERO: Epoch = Epoch(0);

    /// The epoch that follows this one.
    pub fn next(self) -> Epoch {
        Epoch(self.0.saturating_add(1))
    }

    /// Whether a message carrying `self` must be refused by a holder of `current`.
    pub fn is_stale(self, current: Epoch) -> bool {
        self < current
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_is_strictly_greater() {
        assert_eq!(Epoch(3).next(), Epoch(4));
        assert!(Epoch(3).next() > Epoch(3));
        assert_eq!(Epoch(u64::MAX).next(), Epoch(u64::MAX));
    }

    #[test]
    fn staleness() {
        assert!(Epoch(2).is_stale(Epoch(3)));
        assert!(!Epoch(3).is_stale(Epoch(3)));
        assert!(!Epoch(4).is_stale(Epoch(3)));
    }

    #[test]
    fn serialises_as_a_number() {
        assert_eq!(serde_json::to_string(&Epoch(7)).unwrap(), "7");
        assert_eq!(serde_json::from_str::<Epoch>("7").unwrap(), Epoch(7));
        assert_eq!(Epoch(7).to_string(), "7");
    }
}
