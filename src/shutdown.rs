//! Graceful shutdown: the first SIGTERM/SIGINT asks the run to stop; the second exits at once.
//!
//! A Kubernetes pod gets SIGTERM, then SIGKILL after `terminationGracePeriodSeconds`. On the
//! first signal billsync stops pulling, lets an in-flight sink request finish within
//! `shutdown_deadline` (shorter than the grace period), acknowledges what was delivered,
//! records the run and releases its lock. Nothing is half-written at any point: every ledger
//! write is one SQLite transaction, and a record whose request was abandoned stays pending and
//! is resent (same key, same bytes) by the next run.

use tokio::sync::watch;

/// The receiving side, cloned into whatever must stop.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<bool>,
}

/// The sending side, held by the signal handler (or a test).
#[derive(Debug)]
pub struct ShutdownTrigger {
    tx: watch::Sender<bool>,
}

/// A connected trigger and receiver.
pub fn channel() -> (ShutdownTrigger, Shutdown) {
    let (tx, rx) = watch::channel(false);
    (ShutdownTrigger { tx }, Shutdown { rx })
}

impl Shutdown {
    /// A receiver that never fires (library use, tests).
    pub fn never() -> Shutdown {
        let (tx, rx) = watch::channel(false);
        // Keep the sender alive for the life of the program so `requested` pends forever.
        std::mem::forget(tx);
        Shutdown { rx }
    }

    /// Whether a stop was asked for.
    pub fn is_requested(&self) -> bool {
        *self.rx.borrow()
    }

    /// Resolves once a stop is asked for.
    pub async fn requested(&self) {
        let mut rx = self.rx.clone();
        // An error means the trigger is gone without firing: then it never fires.
        if rx.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

impl ShutdownTrigger {
    /// Ask every receiver to stop.
    pub fn trigger(&self) {
        let _ = self.tx.send(true);
    }
}

/// Wait for SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
