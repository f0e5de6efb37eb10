//! Client-side TLS: TLS 1.3, ALPN `tiercast/1`, trusting the certificates
//! given as PEM (an edge's development certificate, or a private CA).

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

pub use tiercast_schemas::ALPN;

/// The quinn client crypto that trusts exactly the certificates in
/// `trusted_pem`.
pub fn client_crypto(
    trusted_pem: &str,
) -> Result<Arc<quinn::crypto::rustls::QuicClientConfig>, String> {
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
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    Ok(Arc::new(quic))
}
