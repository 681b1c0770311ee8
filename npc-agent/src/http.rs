//! The agent's HTTP endpoint: `/healthz` (the process serves), `/readyz` (200 only once the
//! initial policy state is in the maps) and `/metrics` (Prometheus, OpenMetrics text).
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::{Context as _, Result};
use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::TcpListener;
use tracing::{info, warn};

use crate::metrics::{self, Metrics};

/// Whether the initial state has been written to the maps; shared with the sync loop.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Clone, Debug)]
struct AppState {
    ready: Readiness,
    metrics: Metrics,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.ready.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "initial policy state not yet in the maps\n",
        )
    }
}

/// Encodes on the blocking pool: a scrape reads the BPF maps and `/proc`.
async fn metrics_handler(State(state): State<AppState>) -> Response {
    let metrics = state.metrics.clone();
    match tokio::task::spawn_blocking(move || metrics.encode()).await {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response(),
        Ok(Err(e)) => {
            warn!(error = format!("{e:#}"), "encoding the metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}\n")).into_response()
        }
        Err(e) => {
            warn!(error = %e, "encoding the metrics panicked");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "encoding the metrics panicked\n",
            )
                .into_response()
        }
    }
}

/// Binds `addr` and serves in the background until the process ends.
pub async fn serve(addr: SocketAddr, ready: Readiness, metrics: Metrics) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} (--metrics-addr)"))?;
    let local = listener.local_addr()?;
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_handler))
        .with_state(AppState { ready, metrics });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP server stopped");
        }
    });
    info!(addr = %local, "serving /healthz, /readyz and /metrics");
    Ok(local)
}

#[cfg(test)]
mod tests {
    use std::io::{Read as _, Write as _};

    use super::*;

    /// One HTTP/1.1 request; the whole response as text. (Blocking std I/O on the blocking
    /// pool: this crate's tokio has no `io-util`.)
    async fn get(addr: SocketAddr, path: &str) -> String {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        tokio::task::spawn_blocking(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            s.write_all(req.as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn metrics_are_served_as_openmetrics() {
        let metrics = Metrics::without_datapath();
        metrics.set_attached_interfaces(3);
        let addr = serve(
            "127.0.0.1:0".parse().unwrap(),
            Readiness::default(),
            metrics,
        )
        .await
        .unwrap();
        let resp = get(addr, "/metrics").await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(
            resp.to_ascii_lowercase().contains(
                "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\n"
            ),
            "{resp}"
        );
        assert!(resp.contains("\nnpc_attached_interfaces 3\n"), "{resp}");
        assert!(resp.ends_with("# EOF\n"), "{resp}");

        let resp = get(addr, "/readyz").await;
        assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    }
}
