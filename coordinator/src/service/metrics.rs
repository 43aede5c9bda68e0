//! A small HTTP endpoint beside the gRPC server: `GET /metrics` in the Prometheus text
//! format and `GET /healthz`. Hand-written HTTP/1.1 (one request per connection) because
//! two read-only pages do not need a web framework.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::domain::{JobState, MetricsSnapshot, Timestamp};
use crate::graph::JobKind;
use crate::store::Store;

/// Upper bounds (seconds) of the job duration histogram buckets.
const DURATION_BUCKETS: [f64; 9] = [1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0];

/// Renders the metrics in the Prometheus text exposition format.
pub fn render(metrics: &MetricsSnapshot) -> String {
    let mut out = String::new();
    out.push_str(
        "# HELP lorasweep_jobs Jobs by state, over every sweep.\n# TYPE lorasweep_jobs gauge\n",
    );
    for state in JobState::ALL {
        let count = metrics.jobs_by_state.get(&state).copied().unwrap_or(0);
        let _ = writeln!(out, "lorasweep_jobs{{state=\"{}\"}} {count}", state.name());
    }
    out.push_str("# HELP lorasweep_workers_live Workers heard from within the liveness window.\n# TYPE lorasweep_workers_live gauge\n");
    let _ = writeln!(out, "lorasweep_workers_live {}", metrics.live_workers);
    out.push_str("# HELP lorasweep_workers_known Workers ever registered.\n# TYPE lorasweep_workers_known gauge\n");
    let _ = writeln!(out, "lorasweep_workers_known {}", metrics.known_workers);
    out.push_str("# HELP lorasweep_lease_expiries_total Leases that expired (lost workers).\n# TYPE lorasweep_lease_expiries_total counter\n");
    let _ = writeln!(
        out,
        "lorasweep_lease_expiries_total {}",
        metrics.lease_expiries
    );
    out.push_str("# HELP lorasweep_job_duration_seconds Run time of the successful attempt of each succeeded job.\n# TYPE lorasweep_job_duration_seconds histogram\n");
    for kind in [JobKind::Probe, JobKind::Train, JobKind::Eval] {
        let durations: Vec<f64> = metrics
            .job_durations
            .iter()
            .filter(|(job_kind, _)| *job_kind == kind)
            .map(|(_, seconds)| *seconds)
            .collect();
        for bound in DURATION_BUCKETS {
            let count = durations
                .iter()
                .filter(|seconds| **seconds <= bound)
                .count();
            let _ = writeln!(
                out,
                "lorasweep_job_duration_seconds_bucket{{kind=\"{}\",le=\"{bound}\"}} {count}",
                kind.name()
            );
        }
        let _ = writeln!(
            out,
            "lorasweep_job_duration_seconds_bucket{{kind=\"{}\",le=\"+Inf\"}} {}",
            kind.name(),
            durations.len()
        );
        let _ = writeln!(
            out,
            "lorasweep_job_duration_seconds_sum{{kind=\"{}\"}} {}",
            kind.name(),
            durations.iter().sum::<f64>()
        );
        let _ = writeln!(
            out,
            "lorasweep_job_duration_seconds_count{{kind=\"{}\"}} {}",
            kind.name(),
            durations.len()
        );
    }
    out
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    store: Arc<dyn Store>,
    worker_timeout: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "metrics endpoint failed to accept a connection");
                continue;
            }
        };
        let store = store.clone();
        tokio::spawn(async move {
            if let Err(error) = answer(stream, peer, store, worker_timeout).await {
                tracing::debug!(%error, %peer, "metrics request failed");
            }
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    peer: SocketAddr,
    store: Arc<dyn Store>,
    worker_timeout: Duration,
) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let mut buffer = [0u8; 1024];
    while !request.windows(4).any(|window| window == b"\r\n\r\n") {
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "request too slow"))??;
        if read == 0 {
            break;
        }
        request.extend_from_slice(&buffer[..read]);
        if request.len() > 8192 {
            break;
        }
    }
    let request_line = String::from_utf8_lossy(&request);
    let mut words = request_line.split_whitespace();
    let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let (status, content_type, body) = match (method, path) {
        // Healthy means the state database answers: a coordinator whose store is gone must
        // fail its liveness probe rather than hand out errors.
        ("GET", "/healthz") => {
            let store = store.clone();
            let answer = tokio::time::timeout(
                Duration::from_secs(5),
                tokio::task::spawn_blocking(move || {
                    store.metrics(Timestamp::now(), worker_timeout)
                }),
            )
            .await;
            match answer {
                Ok(Ok(Ok(_))) => ("200 OK", "text/plain", "ok\n".to_string()),
                Ok(Ok(Err(error))) => unhealthy(peer, path, format!("store unavailable: {error}")),
                Ok(Err(error)) => unhealthy(peer, path, format!("health task failed: {error}")),
                Err(_) => unhealthy(peer, path, "store did not answer within 5 s"),
            }
        }
        ("GET", "/metrics") => {
            let metrics = tokio::task::spawn_blocking(move || {
                store.metrics(Timestamp::now(), worker_timeout)
            })
            .await;
            match metrics {
                Ok(Ok(metrics)) => ("200 OK", "text/plain; version=0.0.4", render(&metrics)),
                Ok(Err(error)) => unavailable(peer, path, format!("store error: {error}")),
                Err(error) => unavailable(peer, path, format!("metrics task failed: {error}")),
            }
        }
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "not found: try /metrics or /healthz\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET is served\n".to_string(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// `/healthz`'s failure: 503 with a fixed body. Whoever can reach the port learns healthy or not
/// and nothing more (no paths, SQL or error text); the reason goes to the coordinator's log.
fn unhealthy(
    peer: SocketAddr,
    path: &str,
    reason: impl std::fmt::Display,
) -> (&'static str, &'static str, String) {
    tracing::warn!(%peer, path, %reason, "health check failed");
    (
        "503 Service Unavailable",
        "text/plain",
        "unhealthy\n".to_string(),
    )
}

/// `/metrics`' failure: 500 with a fixed body, the reason in the log, as for [`unhealthy`].
fn unavailable(
    peer: SocketAddr,
    path: &str,
    reason: impl std::fmt::Display,
) -> (&'static str, &'static str, String) {
    tracing::warn!(%peer, path, %reason, "metrics request failed");
    (
        "500 Internal Server Error",
        "text/plain",
        "metrics unavailable\n".to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_is_cumulative_per_kind() {
        let mut metrics = MetricsSnapshot::default();
        metrics.jobs_by_state.insert(JobState::Running, 2);
        metrics.lease_expiries = 3;
        metrics.job_durations = vec![
            (JobKind::Train, 10.0),
            (JobKind::Train, 100.0),
            (JobKind::Eval, 0.5),
        ];
        let text = render(&metrics);
        assert!(text.contains("lorasweep_jobs{state=\"running\"} 2\n"));
        assert!(text.contains("lorasweep_jobs{state=\"queued\"} 0\n"));
        assert!(text.contains("lorasweep_lease_expiries_total 3\n"));
        assert!(
            text.contains("lorasweep_job_duration_seconds_bucket{kind=\"train\",le=\"15\"} 1\n")
        );
        assert!(
            text.contains("lorasweep_job_duration_seconds_bucket{kind=\"train\",le=\"300\"} 2\n")
        );
        assert!(
            text.contains("lorasweep_job_duration_seconds_bucket{kind=\"train\",le=\"+Inf\"} 2\n")
        );
        assert!(text.contains("lorasweep_job_duration_seconds_sum{kind=\"train\"} 110\n"));
        assert!(text.contains("lorasweep_job_duration_seconds_count{kind=\"eval\"} 1\n"));
        assert!(text.contains("lorasweep_job_duration_seconds_count{kind=\"probe\"} 0\n"));
    }
}
