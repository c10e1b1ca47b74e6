//! HTTPS for the operator listener: the certificate and key from PEM files, TLS 1.2 and
//! 1.3 with rustls (ring, the process's one crypto provider), swapped on reload without
//! closing the listener. Connections already open keep the certificate they began with.

use std::path::Path;
use std::sync::{Arc, RwLock};

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::config::TlsFiles;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read the certificate chain: {1}", path = .0.display())]
    Certificates(std::path::PathBuf, String),
    #[error("{path}: holds no certificate (expected PEM: -----BEGIN CERTIFICATE-----)", path = .0.display())]
    NoCertificate(std::path::PathBuf),
    #[error("{path}: cannot read the private key (PEM, PKCS#8, PKCS#1 or SEC1): {1}", path = .0.display())]
    Key(std::path::PathBuf, String),
    #[error("{cert} and {key} do not make a usable server identity: {2}", cert = .0.display(), key = .1.display())]
    Mismatch(std::path::PathBuf, std::path::PathBuf, String),
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Certificates(path.to_path_buf(), e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(chain)
}

/// A rustls server configuration from `files`: TLS 1.2 and 1.3, HTTP/1.1 by ALPN.
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let chain = certificates(&files.cert)?;
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| TlsError::Key(files.key.clone(), e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Mismatch(files.cert.clone(), files.key.clone(), e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Mismatch(files.cert.clone(), files.key.clone(), e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The listener's current TLS configuration; each new connection takes what is here.
#[derive(Debug, Clone, Default)]
pub struct TlsSlot(Arc<RwLock<Option<Arc<ServerConfig>>>>);

impl TlsSlot {
    pub fn new(config: Option<Arc<ServerConfig>>) -> TlsSlot {
        TlsSlot(Arc::new(RwLock::new(config)))
    }

    pub fn current(&self) -> Option<Arc<ServerConfig>> {
        // Replaced whole; a panic elsewhere cannot leave it half-written.
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn is_on(&self) -> bool {
        self.current().is_some()
    }

    /// Reads `files` again; on success new connections use them. On failure the
    /// running certificate stays and the error says why.
    pub fn reload(&self, files: &TlsFiles) -> Result<(), TlsError> {
        let config = server_config(files)?;
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(config);
        Ok(())
    }
}
