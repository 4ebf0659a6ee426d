//! The hyper transport: HTTP/2, TLS, requests with bodies and anything the zero-copy transport
//! hands over. It builds the request head, runs the pipeline, and renders its reply as a hyper
//! response whose body feeds the request's meter.

use std::net::IpAddr;
use std::sync::Arc;

use futures_util::StreamExt;
use http::{Request, Response};

use super::body::Body;
use super::pipeline;
use super::request::RequestHead;
use super::response::Payload;
use crate::app::App;

pub async fn handle<B>(app: Arc<App>, req: Request<B>, client: IpAddr) -> Response<Body>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let (parts, body) = req.into_parts();
    let head = RequestHead::from_parts(&parts, client);
    let http1 = parts.version < http::Version::HTTP_2;
    let sends_body = !head.method.is_read();
    // Only requests that may carry one get a body stream (GET and HEAD never read theirs).
    let body = (!head.method.is_read()).then(|| {
        http_body_util::BodyDataStream::new(body)
            .map(|r| r.map_err(std::io::Error::other))
            .boxed()
    });
    let reply = pipeline::handle(&app, head, body).await;
    let body = match reply.payload {
        Payload::Empty => Body::empty(),
        Payload::Bytes(b) => Body::full(b),
        Payload::File { file, start, len } => Body::file(file, start, len),
        Payload::Fill { fill, start, end } => Body::stream(fill.reader(start, end).into_stream()),
    };
    let refused = reply.head.status.is_client_error() || reply.head.status.is_server_error();
    let mut response = reply.head.into_hyper(body.metered(reply.meter));
    // A refused upload may not have been read to its end: the connection cannot carry another
    // request, and the client is told so rather than finding out on its next one.
    if http1 && sends_body && refused {
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    response
}
