//! `/health`, `/metrics` and the status page over HTTP. (Being built.)

use std::future::Future;
use std::net::SocketAddr;

use crate::control::ControlHandle;

/// Serves HTTP on `listen` until `shutdown` resolves.
pub async fn serve_http(
    handle: ControlHandle,
    listen: SocketAddr,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let _ = (handle, listen);
    shutdown.await;
    Ok(())
}
