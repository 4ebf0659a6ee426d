//! The one place that maps failures to OCI error codes, HTTP statuses and JSON bodies.

use http::StatusCode;

/// OCI distribution error codes berth answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadUnknown,
    BlobUploadInvalid,
    DigestInvalid,
    SizeInvalid,
    ManifestBlobUnknown,
    ManifestUnknown,
    ManifestInvalid,
    NameInvalid,
    NameUnknown,
    RangeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    /// Upstream failed and nothing is cached (not an OCI code, but the shape clients expect).
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Internal => "UNKNOWN",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::BlobUnknown
            | ErrorCode::BlobUploadUnknown
            | ErrorCode::ManifestUnknown
            | ErrorCode::NameUnknown => StatusCode::NOT_FOUND,
            ErrorCode::DigestInvalid
            | ErrorCode::ManifestInvalid
            | ErrorCode::NameInvalid
            | ErrorCode::BlobUploadInvalid
            | ErrorCode::SizeInvalid
            | ErrorCode::ManifestBlobUnknown => StatusCode::BAD_REQUEST,
            ErrorCode::RangeInvalid => StatusCode::RANGE_NOT_SATISFIABLE,
            ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorCode::Denied => StatusCode::FORBIDDEN,
            ErrorCode::Unsupported => StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Unavailable => StatusCode::BAD_GATEWAY,
            ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An error a client sees: a code, a message and optionally a status other than the code's.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct RegistryError {
    pub code: ErrorCode,
    pub message: String,
    /// Overrides the code's usual status (e.g. an upstream 503 passed on as 503).
    pub status: Option<StatusCode>,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
    /// A 401 for a valid token that lacks the scope (`error="insufficient_scope"`).
    pub insufficient_scope: bool,
}

impl RegistryError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> RegistryError {
        RegistryError {
            code,
            message: message.into(),
            status: None,
            retry_after: None,
            insufficient_scope: false,
        }
    }

    pub fn insufficient_scope(mut self) -> RegistryError {
        self.insufficient_scope = true;
        self
    }

    pub fn with_status(mut self, status: StatusCode) -> RegistryError {
        self.status = Some(status);
        self
    }

    pub fn with_retry_after(mut self, secs: u64) -> RegistryError {
        self.retry_after = Some(secs);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status.unwrap_or_else(|| self.code.status())
    }

    /// `{"errors":[{"code":…,"message":…,"detail":null}]}`
    pub fn body(&self) -> String {
        serde_json::json!({
            "errors": [{"code": self.code.as_str(), "message": self.message, "detail": null}]
        })
        .to_string()
    }
}

/// Why a configured part could not be set up at start: the config key it comes from, the file
/// it read (if any), and the cause, kept as an error (not flattened to text).
#[derive(Debug, thiserror::Error)]
#[error("{key}{}: {source}", .path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
pub struct SetupError {
    pub key: &'static str,
    pub path: Option<std::path::PathBuf>,
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl SetupError {
    pub fn new(
        key: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> SetupError {
        SetupError {
            key,
            path: None,
            source: source.into(),
        }
    }

    /// A failure reading or using the file that `key` names.
    pub fn file(
        key: &'static str,
        path: &std::path::Path,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> SetupError {
        SetupError {
            key,
            path: Some(path.to_owned()),
            source: source.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_shape() {
        let e = RegistryError::new(ErrorCode::BlobUnknown, "blob \"x\" unknown");
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["errors"][0]["code"], "BLOB_UNKNOWN");
        assert_eq!(v["errors"][0]["message"], "blob \"x\" unknown");
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        let e = e.with_status(StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(e.status(), StatusCode::SERVICE_UNAVAILABLE);
    }

    #[test]
    fn setup_errors_name_the_key_and_keep_the_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let e = SetupError::file("auth.htpasswd", std::path::Path::new("/x"), io);
        assert_eq!(e.to_string(), "auth.htpasswd /x: gone");
        let cause = std::error::Error::source(&e).expect("a cause");
        assert!(cause.downcast_ref::<std::io::Error>().is_some());
        assert_eq!(
            SetupError::new("server.tls", "bad").to_string(),
            "server.tls: bad"
        );
    }
}
