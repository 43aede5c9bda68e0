//! The async runtime the orchestration verbs run on, and the signal that tells them to stop.

use anyhow::{Context, Result};
use tokio::sync::watch;

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A receiver that turns true on Ctrl-C, SIGTERM, or (optionally) standard input closing.
pub(crate) fn shutdown_signal(on_stdin_eof: bool) -> watch::Receiver<bool> {
    let (sender, receiver) = watch::channel(false);
    let signals = sender.clone();
    tokio::spawn(async move {
        #[cfg(unix)]
        {
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let terminated = async {
                match terminate.as_mut() {
                    Some(signal) => {
                        signal.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminated => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
        tracing::info!("shutdown requested");
        let _ = signals.send(true);
    });
    if on_stdin_eof {
        std::thread::spawn(move || {
            // Returns at end of input: the parent closed the pipe or exited.
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            let _ = sender.send(true);
        });
    }
    receiver
}
