//! Client-side TLS: TLS 1.3, ALPN `tiercast/1`, trusting the certificates
//! given as PEM (an edge's development certificate, or a private CA).

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

pub use tiercast_schemas::ALPN;

/// The quinn client crypto that trusts exactly the certificates in
/// `trusted_pem`, keeping the session tickets edges send (reuse it across
/// a device's connections to resume).
pub fn client_crypto(
    trusted_pem: &str,
) -> Result<Arc<quinn::crypto::rustls::QuicClientConfig>, String> {
    with_own_tickets(&client_tls(trusted_pem)?)
}

/// A device's own QUIC crypto from a shared rustls configuration: the
/// trust roots are shared, the session-ticket store is its own (a device
/// resumes with the tickets its edge gave it, never another device's).
pub fn with_own_tickets(
    tls: &rustls::ClientConfig,
) -> Result<Arc<quinn::crypto::rustls::QuicClientConfig>, String> {
    let mut tls = tls.clone();
    // Session tickets, kept in this config: a config used for a device's
    // every connection resumes after the first. A device talks to one
    // fleet name; a few entries are plenty.
    tls.resumption = rustls::client::Resumption::in_memory_sessions(4);
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    Ok(Arc::new(quic))
}

/// The rustls configuration that trusts exactly the certificates in
/// `trusted_pem` (TLS 1.3, ALPN `tiercast/1`), without a ticket store of
/// its own: see [`with_own_tickets`].
pub fn client_tls(trusted_pem: &str) -> Result<rustls::ClientConfig, String> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(trusted_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("bad certificate PEM: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("unusable certificate: {e}"))?;
    }
    if roots.is_empty() {
        return Err("no certificate to trust".into());
    }
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
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(tls)
}

/// A device's TLS state (its trust roots and the session tickets it holds)
/// and its QUIC address-validation tokens, kept across its connections so
/// that they resume, and skip the edge's Retry in a reconnect storm.
#[derive(Clone)]
pub struct ClientTls(
    pub Arc<quinn::crypto::rustls::QuicClientConfig>,
    Arc<quinn::TokenMemoryCache>,
);

impl ClientTls {
    pub fn new(trusted_pem: &str) -> Result<Self, String> {
        client_crypto(trusted_pem).map(Self::from_crypto)
    }

    /// The state of a device that uses `crypto` (with its own ticket
    /// store: [`with_own_tickets`]), with no tokens yet. Up to 8 tokens
    /// per edge name are kept (an edge sends `edge.address_tokens`, 4 by
    /// default, per connection; every connect attempt spends one).
    pub fn from_crypto(crypto: Arc<quinn::crypto::rustls::QuicClientConfig>) -> Self {
        Self(crypto, Arc::new(quinn::TokenMemoryCache::new(2, 8)))
    }

    /// The device's address-validation tokens (a QUIC client
    /// configuration's token store).
    pub fn tokens(&self) -> Arc<dyn quinn::TokenStore> {
        self.1.clone()
    }
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls")
    }
}
