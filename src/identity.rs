//! The caller's identity, read from its verified client certificate.
//!
//! Order of preference: a SPIFFE ID in a URI SAN, then the first DNS SAN,
//! then the subject CN. rustls has already verified the chain; this module
//! only reads names.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::{Error, Result};

/// Longest identity we accept; a longer one is almost surely an attack on
/// our logs and store rather than a real workload name.
const MAX_IDENTITY_LEN: usize = 512;

/// A verified caller identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity(String);

impl Identity {
    /// For callers that are the broker itself (reaper, start-up tasks).
    pub fn system() -> Self {
        Identity("credbroker:system".into())
    }

    pub fn from_cert_der(der: &[u8]) -> Result<Self> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|_| Error::Unauthenticated("client certificate cannot be parsed".into()))?;
        let mut dns: Option<String> = None;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(uri) if uri.starts_with("spiffe://") => {
                        return Self::checked(uri);
                    }
                    GeneralName::DNSName(d) if dns.is_none() => dns = Some(d.to_string()),
                    _ => {}
                }
            }
        }
        if let Some(d) = dns {
            return Self::checked(&d);
        }
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .ok_or_else(|| {
                Error::Unauthenticated("client certificate has no SPIFFE ID, DNS name or CN".into())
            })?;
        Self::checked(cn)
    }

    fn checked(s: &str) -> Result<Self> {
        if s.is_empty() || s.len() > MAX_IDENTITY_LEN || s.chars().any(|c| c.is_control()) {
            return Err(Error::Unauthenticated(
                "client certificate name is empty, too long or has control characters".into(),
            ));
        }
        Ok(Identity(s.to_string()))
    }

    /// Wraps a name read back from the store or given on the command line.
    pub fn from_trusted(s: impl Into<String>) -> Self {
        Identity(s.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
