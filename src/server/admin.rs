//! The admin listener: `/healthz`, `/readyz` and `/metrics`.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};

use super::body::Body;
use crate::app::App;
use crate::cache::check_writable;

fn text(status: StatusCode, s: &'static str) -> Response<Body> {
    let mut r = Response::new(Body::full(Bytes::from_static(s.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub async fn handle<B>(app: Arc<App>, req: Request<B>) -> Response<Body> {
    match req.uri().path() {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if !app.mirror.blobs.is_ready() {
                return text(StatusCode::SERVICE_UNAVAILABLE, "cache index loading\n");
            }
            if !app.mirror.cluster_ready() {
                return text(StatusCode::SERVICE_UNAVAILABLE, "probing cluster peers\n");
            }
            let dir = app.cache_dir.join("tmp");
            match tokio::task::spawn_blocking(move || check_writable(&dir)).await {
                Ok(Ok(())) => text(StatusCode::OK, "ready\n"),
                _ => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cache directory not writable\n",
                ),
            }
        }
        "/metrics" => {
            app.mirror.blobs.run_pending();
            let mut r = Response::new(Body::full(app.mirror.metrics().render()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
