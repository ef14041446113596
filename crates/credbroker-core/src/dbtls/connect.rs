//! The drivers' TLS configurations for checked `TlsParams`: a rustls
//! client config on the ring provider (with our `verify-ca` verifier) for
//! tokio-postgres, and mysql_async's `SslOpts`. Apart from the parameters:
//! here the certificate files are read, so a broken one is a start-up error.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::{RootCert, SslMode, TlsParams, TlsSetupError};

/// The ring provider, always: never the process default, which another
/// crate could have installed.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

/// The operating system's CA bundle: `SSL_CERT_FILE`, else the usual
/// Debian/Fedora/Alpine locations.
fn system_roots() -> Result<Vec<CertificateDer<'static>>, String> {
    let candidates: Vec<PathBuf> = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .into_iter()
        .chain(
            [
                "/etc/ssl/certs/ca-certificates.crt",
                "/etc/pki/tls/certs/ca-bundle.crt",
                "/etc/ssl/cert.pem",
            ]
            .map(PathBuf::from),
        )
        .collect();
    let path = candidates
        .iter()
        .find(|p| p.is_file())
        .ok_or("sslrootcert=system: no CA bundle found (set SSL_CERT_FILE)")?;
    pem_certs("sslrootcert=system", path)
}

fn pem_certs(what: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(&read(what, path)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{what} {}: not PEM certificates: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no certificate in the file",
            path.display()
        ));
    }
    Ok(certs)
}

/// A rustls client configuration for these parameters (ring provider;
/// TLS 1.2 and 1.3). Reads the certificate files now, so a missing or
/// broken file is a start-up error.
pub fn client_config(params: &TlsParams) -> Result<rustls::ClientConfig, TlsSetupError> {
    let [_, root_key, cert_key, key_key] = params.dialect.names();
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?;
    let mode = params.effective_mode();
    let verifier: Arc<dyn ServerCertVerifier> = if mode >= SslMode::VerifyCa {
        let certs = match &params.rootcert {
            Some(RootCert::File(path)) => pem_certs(root_key, path)?,
            Some(RootCert::System) => system_roots()?,
            // split_url refuses verify-* without a root certificate.
            None => return Err(format!("{root_key} is missing").into()),
        };
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("{root_key}: unusable CA certificate: {e}"))?;
        }
        let roots = Arc::new(roots);
        if mode == SslMode::VerifyFull {
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| format!("{root_key}: {e}"))?
        } else {
            Arc::new(NameUnchecked {
                roots: Some(roots),
                algorithms: provider.signature_verification_algorithms,
            })
        }
    } else {
        Arc::new(NameUnchecked {
            roots: None,
            algorithms: provider.signature_verification_algorithms,
        })
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match (&params.cert, &params.key) {
        (Some(cert), Some(key)) => {
            let chain = pem_certs(cert_key, cert)?;
            let key = PrivateKeyDer::from_pem_slice(&read(key_key, key)?)
                .map_err(|e| format!("{key_key} {}: not a PEM private key: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("{cert_key}/{key_key}: {e}").into())
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// The verifiers for a server whose name is not checked:
/// - `verify-ca` (`roots` set): the chain must lead to a trusted root; the
///   name in it is not checked (libpq's meaning: the CA is private to these
///   servers);
/// - `prefer`/`require` without a root certificate (`roots` unset):
///   encrypted, but any certificate is accepted (libpq's meaning; the
///   start-up warning says so).
///
/// Either way the handshake signature is checked, so the peer holds the
/// key of the certificate it sent.
#[derive(Debug)]
struct NameUnchecked {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NameUnchecked {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The tokio-postgres connector and mode for these parameters.
pub fn postgres_connector(
    params: &TlsParams,
) -> Result<
    (
        tokio_postgres_rustls::MakeRustlsConnect,
        tokio_postgres::config::SslMode,
    ),
    TlsSetupError,
> {
    use tokio_postgres::config::SslMode as Pg;
    let mode = match params.mode {
        SslMode::Disable => Pg::Disable,
        SslMode::Prefer => Pg::Prefer,
        _ => Pg::Require,
    };
    Ok((
        tokio_postgres_rustls::MakeRustlsConnect::new(client_config(params)?),
        mode,
    ))
}

/// mysql_async's TLS options for these parameters (it builds its own
/// rustls config, on the ring provider: the only one compiled in). The
/// files are read now, so a broken one is a start-up error.
pub fn mysql_ssl_opts(params: &TlsParams) -> Result<Option<mysql_async::SslOpts>, TlsSetupError> {
    use mysql_async::{ClientIdentity, SslOpts};
    let [_, root_key, cert_key, key_key] = params.dialect.names();
    let opts = match params.effective_mode() {
        SslMode::Disable => return Ok(None),
        // REQUIRED: encrypted, any certificate (the warning says so).
        SslMode::Prefer | SslMode::Require => SslOpts::default()
            .with_danger_accept_invalid_certs(true)
            .with_danger_skip_domain_validation(true),
        SslMode::VerifyCa | SslMode::VerifyFull => match &params.rootcert {
            Some(RootCert::File(path)) => {
                // Read here for the error message; the driver reads it again.
                pem_certs(root_key, path)?;
                SslOpts::default()
                    .with_root_certs(vec![path.clone().into()])
                    .with_disable_built_in_roots(true)
            }
            // The driver's built-in (webpki) roots.
            Some(RootCert::System) => SslOpts::default(),
            None => return Err(format!("{root_key} is missing").into()),
        },
    };
    let opts = match (&params.cert, &params.key) {
        (Some(cert), Some(key)) => {
            pem_certs(cert_key, cert)?;
            PrivateKeyDer::from_pem_slice(&read(key_key, key)?)
                .map_err(|e| format!("{key_key} {}: not a PEM private key: {e}", key.display()))?;
            opts.with_client_identity(Some(ClientIdentity::new(
                cert.clone().into(),
                key.clone().into(),
            )))
        }
        _ => opts,
    };
    Ok(Some(opts))
}
