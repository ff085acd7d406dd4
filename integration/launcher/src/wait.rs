//! Waiting on a condition with a deadline, instead of sleeping and hoping.
//!
//! [`eventually`] retries an async check with a small growing backoff until it
//! succeeds or the deadline passes; each attempt is itself cut off at the
//! deadline, so a hanging attempt cannot stretch the wait. On timeout the
//! error names what was awaited and carries the last attempt's error.

use std::future::Future;
use std::time::Duration;

use anyhow::anyhow;
use tokio::time::Instant;

/// First pause between attempts; it doubles up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(10);
/// Longest pause between attempts.
pub const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// Runs `f` until it returns `Ok`, for at most `deadline`; returns its value.
/// On timeout: an error "timed out after .. waiting for `what`" whose cause is
/// the last attempt's error.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let end = Instant::now() + deadline;
    let mut pause = FIRST_BACKOFF;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let last = match tokio::time::timeout_at(end, f()).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) => e,
            Err(_) => anyhow!("the attempt was still running at the deadline"),
        };
        if Instant::now() + pause >= end {
            return Err(last.context(format!(
                "timed out after {deadline:?} ({attempts} attempts) waiting for {what}"
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn returns_the_first_success() {
        let calls = AtomicU32::new(0);
        let v = eventually(Duration::from_secs(5), "third call", || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            anyhow::ensure!(n >= 3, "call {n}");
            Ok(n * 10)
        })
        .await
        .unwrap();
        assert_eq!(v, 30);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn times_out_with_what_and_the_last_error() {
        let calls = AtomicU32::new(0);
        let started = Instant::now();
        let err = eventually(Duration::from_millis(200), "the impossible", || async {
            let n = calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(anyhow!("still failing #{n}"))
        })
        .await
        .unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("waiting for the impossible"), "{text}");
        let n = calls.load(Ordering::SeqCst);
        assert!(n >= 3, "retried only {n} times");
        assert!(
            text.contains(&format!("still failing #{}", n - 1)),
            "{text}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_hanging_attempt_is_cut_at_the_deadline() {
        let started = Instant::now();
        let err = eventually(Duration::from_millis(100), "a hang", || async {
            std::future::pending::<()>().await;
            Ok(())
        })
        .await
        .unwrap_err();
        assert!(format!("{err:#}").contains("still running at the deadline"));
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
