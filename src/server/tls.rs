//! TLS for the registry listener: rustls with HTTP/1.1 and HTTP/2 by ALPN, optional client
//! certificates, and a certificate that is reloaded when its files change or on SIGHUP —
//! new handshakes get the new certificate, open connections are not dropped.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

use parking_lot::RwLock;
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;
use crate::error::SetupError;

/// How often the certificate files are checked for changes.
const POLL: Duration = Duration::from_secs(2);

#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
    stamp: RwLock<Option<(SystemTime, SystemTime)>>,
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().clone())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn load(cert: &Path, key: &Path) -> Result<CertifiedKey, SetupError> {
    let cert_error = |e| SetupError::file("server.tls.cert", cert, e);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(cert_error)?
        .collect::<Result<_, _>>()
        .map_err(cert_error)?;
    if certs.is_empty() {
        return Err(SetupError::file(
            "server.tls.cert",
            cert,
            "no certificate in the file",
        ));
    }
    let key_der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| SetupError::file("server.tls.key", key, e))?;
    CertifiedKey::from_der(certs, key_der, &provider()).map_err(|e| {
        SetupError::new(
            "server.tls",
            format!("certificate and key do not fit together: {e}"),
        )
    })
}

fn stamp(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(cert)?, m(key)?))
}

impl Reloading {
    fn reload(&self, why: &str) {
        match load(&self.cert, &self.key) {
            Ok(ck) => {
                {
                    let mut c = self.current.write();
                    *c = Arc::new(ck);
                }
                tracing::info!(cert = %self.cert.display(), why, "TLS certificate reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, why, "TLS certificate reload failed; keeping the current one")
            }
        }
    }
}

/// Builds the acceptor and starts watching the certificate files.
pub(crate) fn acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, SetupError> {
    let resolver = Arc::new(Reloading {
        current: RwLock::new(Arc::new(load(&cfg.cert, &cfg.key)?)),
        stamp: RwLock::new(stamp(&cfg.cert, &cfg.key)),
        cert: cfg.cert.clone(),
        key: cfg.key.clone(),
    });
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| SetupError::new("server.tls", e))?;
    let builder = match &cfg.client_ca {
        Some(ca) => {
            let ca_error = |e: Box<dyn std::error::Error + Send + Sync>| {
                SetupError::file("server.tls.client_ca", ca, e)
            };
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| ca_error(e.into()))? {
                let c = c.map_err(|e| ca_error(e.into()))?;
                roots.add(c).map_err(|e| ca_error(e.into()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| ca_error(e.into()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver.clone());
    config.alpn_protocols = cfg.alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    watch(Arc::downgrade(&resolver));
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn watch(resolver: Weak<Reloading>) {
    let weak = resolver.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(POLL).await;
            let Some(r) = weak.upgrade() else { return };
            let now = stamp(&r.cert, &r.key);
            let changed = *r.stamp.read() != now;
            if changed && now.is_some() {
                {
                    let mut s = r.stamp.write();
                    *s = now;
                }
                r.reload("files changed");
            }
        }
    });
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            let Some(r) = resolver.upgrade() else { return };
            r.reload("SIGHUP");
        }
    });
}
