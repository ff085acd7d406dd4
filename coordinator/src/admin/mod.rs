//! The gRPC admin API (tonic) over a [`ControlHandle`]: status, switchover,
//! failover, pause/resume, events. (Being built; see `serve_admin`.)

use std::future::Future;
use std::net::SocketAddr;

use meridian_shared::keys::Keys;

use crate::control::ControlHandle;

/// Serves the admin API on `listen` until `shutdown` resolves.
pub async fn serve_admin(
    handle: ControlHandle,
    etcd: etcd_client::Client,
    keys: Keys,
    listen: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let _ = (handle, etcd, keys, listen);
    shutdown.await;
    Ok(())
}
