//! One HTTP request, blocking (reqwest on a private runtime, see [`block_on`]): for the raw
//! registry API checks a real client cannot make (an anonymous `POST` of an upload, a mount
//! from a repository the user may not pull).

use std::time::Duration;

use reqwest::Method;

use super::seed::block_on;

/// What came back.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Reply {
    /// The header's value (the first, if repeated), if it is there and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// `errors[0].code` of a registry error body ("" if there is none).
    pub fn error_code(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// `METHOD url` with HTTP basic `credentials` (if any) and `body`; 20 s at most, no redirects
/// followed, no proxy. Panics if no answer arrives.
pub fn request(
    method: &str,
    url: &str,
    credentials: Option<(&str, &str)>,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Reply {
    let method = Method::from_bytes(method.as_bytes()).expect("HTTP method");
    block_on(async {
        let client = reqwest::Client::builder()
            .user_agent("berth-tests/http")
            .timeout(Duration::from_secs(20))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .expect("build reqwest client");
        let mut req = client.request(method.clone(), url).body(body);
        if let Some((user, password)) = credentials {
            req = req.basic_auth(user, Some(password));
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
        Reply {
            status,
            headers,
            body,
        }
    })
}
