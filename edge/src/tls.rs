//! TLS for the QUIC listener: TLS 1.3 only (QUIC requires it), ALPN
//! `tiercast/1`, rustls with the ring provider. The certificate is read from
//! PEM files in production, or generated self-signed in development.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub use tiercast_schemas::ALPN;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read certificate {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("cannot read private key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("cannot generate a self-signed certificate: {0}")]
    Generate(String),
    #[error("TLS configuration rejected: {0}")]
    Config(String),
}

/// A certificate chain and its key.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// The chain as PEM, for clients to trust (in development, the only way
    /// they can).
    pub chain_pem: String,
}

impl Identity {
    /// A self-signed certificate for `names` (development only: clients must
    /// be given the certificate to trust it).
    pub fn self_signed(names: &[String]) -> Result<Self, TlsError> {
        Ok(Self::self_signed_with_key(names)?.0)
    }

    /// [`Self::self_signed`], with the key as PEM (to keep it beside the
    /// certificate, so that a restarted development node keeps the
    /// certificate its clients trust).
    pub fn self_signed_with_key(names: &[String]) -> Result<(Self, String), TlsError> {
        let ck = rcgen::generate_simple_self_signed(names.to_vec())
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        let key_pem = ck.signing_key.serialize_pem();
        Ok((
            Self {
                chain: vec![ck.cert.der().clone()],
                key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.signing_key.serialize_der())),
                chain_pem: ck.cert.pem(),
            },
            key_pem,
        ))
    }

    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let chain_pem = std::fs::read_to_string(cert).map_err(|e| TlsError::Cert {
            path: cert.display().to_string(),
            reason: e.to_string(),
        })?;
        let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Cert {
                path: cert.display().to_string(),
                reason: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(TlsError::Cert {
                path: cert.display().to_string(),
                reason: "no certificate in file".into(),
            });
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
            path: key.display().to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            chain,
            key,
            chain_pem,
        })
    }
}

/// The rustls server configuration for QUIC, without session tickets
/// (every handshake a full one).
pub fn server_crypto(
    id: Identity,
) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TlsError> {
    server_crypto_with_tickets(id, None, 0)
}

/// [`server_crypto`], issuing and accepting session tickets sealed by
/// `tickets` (see [`crate::tickets`]): a device that comes back resumes,
/// skipping the certificate signature. `per_handshake` tickets go out
/// after each handshake (see `edge.tickets_per_handshake`).
pub fn server_crypto_with_tickets(
    id: Identity,
    tickets: Option<Arc<dyn rustls::server::ProducesTickets>>,
    per_handshake: usize,
) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>, TlsError> {
    // TLS_AES_128_GCM_SHA256 first (ring's default puts AES-256/SHA-384
    // first): QUIC's Initial packets use it anyway, and SHA-256 has
    // hardware support on current x86 and ARM cores where SHA-512 does
    // not; the handshake's transcript hashes and key schedule are a sixth
    // of its CPU (docs/benchmarks.md, "Reconnects").
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let provider = Arc::new(provider);
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(id.chain, id.key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No 0-RTT: early data is replayable, and a replayed Send or Ack is
    // not something to accept before the handshake completes.
    tls.max_early_data_size = 0;
    if let Some(t) = tickets {
        tls.ticketer = t;
        tls.send_tls13_tickets = per_handshake;
    }
    // Each connection drops its rustls session once the handshake is over
    // and the tickets are written (quinn-proto patch 9, ADR 0015): 2-3 KB
    // per idle connection that only exporting keying material needs, which
    // the edge does not do. Key updates keep working from the secrets kept.
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?
        .release_session_after_handshake(true);
    Ok(Arc::new(quic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_pem_reads_back() {
        let id = Identity::self_signed(&["localhost".into()]).unwrap();
        let back = CertificateDer::from_pem_slice(id.chain_pem.as_bytes()).unwrap();
        assert_eq!(back, id.chain[0]);
        assert!(server_crypto(id).is_ok());
    }
}
