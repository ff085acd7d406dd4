//! Cancel keys: the proxy gives each client its own (pid, secret) and maps it
//! to the backend currently running that client's query, so a `CancelRequest`
//! reaches the right server even though clients move between backends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The backend a client's query is running on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendKey {
    pub addr: Arc<str>,
    pub pid: i32,
    pub secret: i32,
}

/// Shared slot a session updates whenever its active backend changes.
pub type CancelSlot = Arc<Mutex<Option<BackendKey>>>;

#[derive(Default)]
pub struct CancelRegistry {
    map: Mutex<HashMap<(i32, i32), CancelSlot>>,
}

impl CancelRegistry {
    /// Issues a fresh client key and its slot.
    pub fn register(&self) -> ((i32, i32), CancelSlot) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let key = (rand::random::<i32>() & 0x7fff_ffff, rand::random::<i32>());
            if let std::collections::hash_map::Entry::Vacant(v) = map.entry(key) {
                let slot = CancelSlot::default();
                v.insert(slot.clone());
                return (key, slot);
            }
        }
    }

    /// Issues a key for a client that was given backend process id `pid` (a session
    /// bound to that backend): only the secret is chosen, unique for that pid.
    pub fn register_with_pid(&self, pid: i32) -> ((i32, i32), CancelSlot) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let key = (pid, rand::random::<i32>());
            if let std::collections::hash_map::Entry::Vacant(v) = map.entry(key) {
                let slot = CancelSlot::default();
                v.insert(slot.clone());
                return (key, slot);
            }
        }
    }

    pub fn unregister(&self, key: (i32, i32)) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
    }

    /// The backend to cancel for a client key, if the key is known and busy.
    pub fn lookup(&self, key: (i32, i32)) -> Option<BackendKey> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let slot = map.get(&key)?;
        let b = slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
        b
    }
}
