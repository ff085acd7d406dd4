//! The client's transaction, as one value: [`Tx`]. The status the client sees
//! (`ReadyForQuery`'s byte) is derived from it, never stored beside it.
//!
//! A `BEGIN` may be deferred ([`Tx::Deferred`]): the proxy answers it and sends it in front
//! of the transaction's first statement, which decides where the transaction runs. Once
//! a backend runs it, the backend's `ReadyForQuery` status is the truth ([`Tx::on_ready`]).
//! [`Tx::Lost`] is the proxy's own failure inside a transaction whose backend never existed
//! or cannot be reached (no backend for the deferred transaction's first statement):
//! statements fail with 25P02 until the client ends the transaction.

use crate::protocol::backend::TxStatus;
use crate::route::Which;
use crate::wire::Frame;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Tx {
    #[default]
    Idle,
    /// `BEGIN` answered by the proxy, not sent yet (`frame` is the client's Query).
    Deferred { frame: Frame, read_only: bool },
    /// A transaction block on backend `on`; `failed` after an error in it.
    Open { on: Which, failed: bool },
    /// The proxy lost the transaction (see the module doc).
    Lost,
}

impl Tx {
    /// What the client's `ReadyForQuery` says.
    pub fn status(&self) -> TxStatus {
        match self {
            Tx::Idle => TxStatus::Idle,
            Tx::Deferred { .. } | Tx::Open { failed: false, .. } => TxStatus::InTransaction,
            Tx::Open { failed: true, .. } | Tx::Lost => TxStatus::Failed,
        }
    }

    /// The backend the transaction runs on.
    pub fn backend(&self) -> Option<Which> {
        match self {
            Tx::Open { on, .. } => Some(*on),
            _ => None,
        }
    }

    /// Inside a transaction block (from the client's point of view).
    pub fn in_block(&self) -> bool {
        !matches!(self, Tx::Idle)
    }

    /// A backend's `ReadyForQuery` for the client's request: the backend's status is the
    /// transaction's.
    pub fn on_ready(&mut self, w: Which, status: TxStatus) {
        *self = match status {
            TxStatus::Idle => Tx::Idle,
            TxStatus::InTransaction => Tx::Open {
                on: w,
                failed: false,
            },
            TxStatus::Failed => Tx::Open {
                on: w,
                failed: true,
            },
        };
    }

    /// The deferred `BEGIN` is being sent to `w`.
    pub fn take_deferred(&mut self, w: Which) -> Option<Frame> {
        if let Tx::Deferred { frame, .. } = self {
            let frame = frame.clone();
            *self = Tx::Open {
                on: w,
                failed: false,
            };
            Some(frame)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire;

    #[test]
    fn status_follows_the_backend_and_deferral() {
        let mut tx = Tx::Idle;
        assert_eq!(tx.status(), TxStatus::Idle);
        tx = Tx::Deferred {
            frame: wire::encode_query("BEGIN"),
            read_only: false,
        };
        assert_eq!(tx.status(), TxStatus::InTransaction);
        assert!(tx.take_deferred(Which::Replica).is_some());
        assert_eq!(tx.backend(), Some(Which::Replica));
        assert!(tx.take_deferred(Which::Replica).is_none());
        tx.on_ready(Which::Replica, TxStatus::Failed);
        assert_eq!(tx.status(), TxStatus::Failed);
        tx.on_ready(Which::Replica, TxStatus::Idle);
        assert_eq!(tx, Tx::Idle);
        assert_eq!(Tx::Lost.status(), TxStatus::Failed);
    }
}
