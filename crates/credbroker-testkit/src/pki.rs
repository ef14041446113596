//! Development certificates: a CA, a server certificate and client
//! certificates carrying SPIFFE IDs, plus CRLs. ECDSA P-256 throughout.
//!
//! This is for `credbroker pki dev`, the demo and tests — not a production CA:
//! the CA key sits in a plain (0600) file.

use std::fmt;
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Duration, Utc};
use rand::Rng;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
};

/// The SPIFFE IDs of the client certificates [`write_dev_pki`] makes.
pub const DEV_APP_ID: &str = "spiffe://credbroker.dev/ns/demo/app";
pub const DEV_OTHER_ID: &str = "spiffe://credbroker.dev/ns/demo/other";
pub const DEV_ADMIN_ID: &str = "spiffe://credbroker.dev/dba/oncall";

/// The password of the dev PKI's `admin.p12` (browsers refuse to import a
/// PKCS#12 file without one). Published on purpose: the dev PKI's CA key
/// sits next to it anyway, so this protects nothing and is never used
/// for a real certificate.
pub const DEV_P12_PASSWORD: &str = "credbroker-dev";

/// rcgen wants `time::OffsetDateTime`. Adding a `std::time::Duration` to
/// rcgen's own epoch value builds one without a direct dependency on `time`
/// (whose type we could not otherwise name).
macro_rules! rcgen_time {
    ($t:expr) => {{
        let t: DateTime<Utc> = $t;
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        let secs = t.timestamp();
        let offset = std::time::Duration::from_secs(secs.unsigned_abs())
            .try_into()
            .map_err(|_| rcgen::Error::Time)?;
        if secs >= 0 {
            epoch.checked_add(offset)
        } else {
            epoch.checked_sub(offset)
        }
        .ok_or(rcgen::Error::Time)?
    }};
}

/// A certificate and its private key, both PEM. `key_pem` is secret.
#[derive(Clone)]
pub struct CertPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for CertPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_redacting_key(f, "CertPair", &self.cert_pem, "key_pem")
    }
}

/// `Debug` of a certificate with its private key: the certificate shown,
/// the key (field `key`) never.
fn debug_redacting_key(
    f: &mut fmt::Formatter<'_>,
    name: &str,
    cert_pem: &str,
    key: &str,
) -> fmt::Result {
    f.debug_struct(name)
        .field("cert_pem", &cert_pem)
        .field(key, &"<redacted>")
        .finish()
}

/// What goes into a client certificate. The broker derives the caller's
/// identity from the SPIFFE URI SAN (`spiffe://…`), else the DNS SAN
/// (`dns:…`), else the CN (`cn:…`).
#[derive(Debug, Clone)]
pub struct ClientSpec {
    /// Subject CN. When `None`, the SPIFFE ID or DNS name is used, so tools
    /// like `openssl x509 -subject` show something readable.
    pub common_name: Option<String>,
    /// URI SAN, e.g. `spiffe://credbroker.dev/ns/demo/app`.
    pub spiffe_id: Option<String>,
    /// DNS SAN.
    pub dns_name: Option<String>,
    /// More URI SANs after `spiffe_id`, for tests of certificates the broker
    /// must refuse (two SPIFFE IDs) or ignore (`https://…`).
    pub extra_uris: Vec<String>,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    /// Random (below 2^63) when `None`. Set it to revoke the cert in a CRL later.
    pub serial: Option<u64>,
}

impl ClientSpec {
    fn valid_now() -> ClientSpec {
        let now = Utc::now();
        ClientSpec {
            common_name: None,
            spiffe_id: None,
            dns_name: None,
            extra_uris: Vec::new(),
            // An hour of slack for clocks that run behind ours.
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(365),
            serial: None,
        }
    }

    /// A SPIFFE identity, valid from an hour ago for a year.
    pub fn spiffe(spiffe_id: &str) -> ClientSpec {
        ClientSpec {
            spiffe_id: Some(spiffe_id.to_owned()),
            ..ClientSpec::valid_now()
        }
    }

    /// A DNS-name identity (no URI SAN), valid from an hour ago for a year.
    pub fn dns(dns_name: &str) -> ClientSpec {
        ClientSpec {
            dns_name: Some(dns_name.to_owned()),
            ..ClientSpec::valid_now()
        }
    }

    /// A CN-only identity (no SANs), valid from an hour ago for a year.
    pub fn common_name(common_name: &str) -> ClientSpec {
        ClientSpec {
            common_name: Some(common_name.to_owned()),
            ..ClientSpec::valid_now()
        }
    }

    /// A SPIFFE identity whose certificate expired yesterday.
    pub fn expired(spiffe_id: &str) -> ClientSpec {
        let now = Utc::now();
        ClientSpec {
            not_before: now - Duration::days(30),
            not_after: now - Duration::days(1),
            ..ClientSpec::spiffe(spiffe_id)
        }
    }
}

/// A development CA that keeps its key, so it can sign more certificates and
/// CRLs later (also after [`DevCa::load`]ing it from files).
pub struct DevCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl fmt::Debug for DevCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        debug_redacting_key(f, "DevCa", &self.cert_pem, "key")
    }
}

/// Below 2^63, so serials also fit signed 64-bit columns (SQLite, PostgreSQL).
fn random_serial() -> u64 {
    rand::rng().random_range(1..=i64::MAX as u64)
}

fn subject(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "credbroker dev");
    dn.push(DnType::CommonName, common_name);
    dn
}

impl DevCa {
    /// A new self-signed CA, valid from an hour ago for ten years.
    pub fn generate(common_name: &str) -> Result<DevCa, rcgen::Error> {
        let now = Utc::now();
        let mut params = CertificateParams::default();
        params.distinguished_name = subject(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            // webpki rejects CRLs from a CA without it.
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(SerialNumber::from(random_serial()));
        params.not_before = rcgen_time!(now - Duration::hours(1));
        params.not_after = rcgen_time!(now + Duration::days(3650));
        params.key_identifier_method = KeyIdMethod::Sha256;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(DevCa {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// A CA from its stored certificate and private key (PEM).
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<DevCa, rcgen::Error> {
        let key = KeyPair::from_pem(key_pem)?;
        // Issuer does not check that the key belongs to the certificate, and a
        // mismatch would only show later as certificates nobody can verify.
        let der = pem_certificate_der(cert_pem)?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(rcgen::Error::RingKeyRejected(
                "the CA private key does not belong to the CA certificate".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&der.into(), key)?;
        Ok(DevCa {
            issuer,
            cert_pem: cert_pem.to_owned(),
        })
    }

    pub fn cert_pem(&self) -> String {
        self.cert_pem.clone()
    }

    /// The CA's private key. Secret.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A TLS server certificate (ServerAuth) for these names, valid from an
    /// hour ago for a year.
    pub fn server_cert(
        &self,
        dns_names: &[&str],
        ips: &[IpAddr],
    ) -> Result<CertPair, rcgen::Error> {
        let now = Utc::now();
        let mut params = CertificateParams::default();
        let common_name = dns_names.first().copied().unwrap_or("credbroker server");
        params.distinguished_name = subject(common_name);
        for name in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName((*name).try_into()?));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = rcgen_time!(now - Duration::hours(1));
        params.not_after = rcgen_time!(now + Duration::days(365));
        self.sign(params, random_serial())
    }

    /// A TLS client certificate (ClientAuth) as described by `spec`.
    pub fn client_cert(&self, spec: &ClientSpec) -> Result<CertPair, rcgen::Error> {
        let mut params = CertificateParams::default();
        let common_name = spec
            .common_name
            .as_deref()
            .or(spec.spiffe_id.as_deref())
            .or(spec.dns_name.as_deref());
        params.distinguished_name = match common_name {
            Some(cn) => subject(cn),
            None => DistinguishedName::new(),
        };
        if let Some(id) = &spec.spiffe_id {
            params
                .subject_alt_names
                .push(SanType::URI(id.as_str().try_into()?));
        }
        for uri in &spec.extra_uris {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into()?));
        }
        if let Some(name) = &spec.dns_name {
            params
                .subject_alt_names
                .push(SanType::DnsName(name.as_str().try_into()?));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = rcgen_time!(spec.not_before);
        params.not_after = rcgen_time!(spec.not_after);
        self.sign(params, spec.serial.unwrap_or_else(random_serial))
    }

    fn sign(&self, mut params: CertificateParams, serial: u64) -> Result<CertPair, rcgen::Error> {
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(SerialNumber::from(serial));
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A CRL (PEM) revoking these serials, valid from now for 30 days. Its CRL
    /// number is the current time in milliseconds, so a newer CRL always has a
    /// higher number.
    pub fn crl(&self, revoked_serials: &[u64]) -> Result<String, rcgen::Error> {
        let now = Utc::now();
        self.crl_between(
            revoked_serials,
            // A minute of slack for clocks that run behind ours.
            now - Duration::minutes(1),
            now + Duration::days(30),
        )
    }

    /// A CRL (PEM) with explicit `thisUpdate`/`nextUpdate` (tests make
    /// expired ones with it).
    pub fn crl_between(
        &self,
        revoked_serials: &[u64],
        this_update: chrono::DateTime<Utc>,
        next_update: chrono::DateTime<Utc>,
    ) -> Result<String, rcgen::Error> {
        let now = Utc::now();
        let revoked_certs = revoked_serials
            .iter()
            .map(|serial| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from(*serial),
                    revocation_time: rcgen_time!(now),
                    reason_code: None,
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, rcgen::Error>>()?;
        let params = CertificateRevocationListParams {
            this_update: rcgen_time!(this_update),
            next_update: rcgen_time!(next_update),
            crl_number: SerialNumber::from(now.timestamp_millis().unsigned_abs()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        params.signed_by(&self.issuer)?.pem()
    }
}

fn pem_certificate_der(cert_pem: &str) -> Result<Vec<u8>, rcgen::Error> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|_| rcgen::Error::CouldNotParseCertificate)?;
    if pem.label != "CERTIFICATE" {
        return Err(rcgen::Error::CouldNotParseCertificate);
    }
    Ok(pem.contents)
}

/// The serial number of a PEM certificate, if it fits a `u64` (ours do).
pub fn cert_serial(cert_pem: &str) -> Option<u64> {
    let der = pem_certificate_der(cert_pem).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let raw = cert.raw_serial();
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let digits = &raw[start..];
    if digits.len() > 8 {
        return None;
    }
    Some(
        digits
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
    )
}

/// Writes a dev PKI into `out_dir` (created if missing; existing files are
/// overwritten): `ca.pem`, `ca-key.pem`, an empty CRL `ca.crl`, `server.pem`
/// and `server-key.pem` for localhost, 127.0.0.1 and ::1, and client
/// certificates `app`, `other` and `admin` (`*.pem`, `*-key.pem`) for
/// [`DEV_APP_ID`], [`DEV_OTHER_ID`] and [`DEV_ADMIN_ID`]. Keys are 0600.
/// Returns the files written.
pub fn write_dev_pki(out_dir: &Path) -> io::Result<Vec<PathBuf>> {
    let pki_error =
        |e: rcgen::Error| io::Error::other(format!("cannot generate certificates: {e}"));
    std::fs::create_dir_all(out_dir)
        .map_err(|e| io::Error::other(format!("cannot create {}: {e}", out_dir.display())))?;
    let ca = DevCa::generate("credbroker dev CA").map_err(pki_error)?;
    let mut written = Vec::new();
    let mut write = |name: &str, contents: &str, secret: bool| -> io::Result<()> {
        let path = out_dir.join(name);
        write_file(&path, contents, secret)
            .map_err(|e| io::Error::other(format!("cannot write {}: {e}", path.display())))?;
        written.push(path);
        Ok(())
    };
    write("ca.pem", &ca.cert_pem(), false)?;
    write("ca-key.pem", &ca.key_pem(), true)?;
    write("ca.crl", &ca.crl(&[]).map_err(pki_error)?, false)?;
    let server = ca
        .server_cert(
            &["localhost"],
            &[
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ],
        )
        .map_err(pki_error)?;
    write("server.pem", &server.cert_pem, false)?;
    write("server-key.pem", &server.key_pem, true)?;
    let mut admin = None;
    for (name, id) in [
        ("app", DEV_APP_ID),
        ("other", DEV_OTHER_ID),
        ("admin", DEV_ADMIN_ID),
    ] {
        let pair = ca.client_cert(&ClientSpec::spiffe(id)).map_err(pki_error)?;
        write(&format!("{name}.pem"), &pair.cert_pem, false)?;
        write(&format!("{name}-key.pem"), &pair.key_pem, true)?;
        if name == "admin" {
            admin = Some(pair);
        }
    }
    if let Some(pair) = admin {
        // For the web console: a browser imports a PKCS#12 file.
        let p12 = pkcs12(&pair, &ca.cert_pem(), DEV_P12_PASSWORD).map_err(pki_error)?;
        let path = out_dir.join("admin.p12");
        write_bytes(&path, &p12, true)
            .map_err(|e| io::Error::other(format!("cannot write {}: {e}", path.display())))?;
        written.push(path);
    }
    Ok(written)
}

/// `pair` (with the CA certificate as its chain) as a PKCS#12 file under
/// `password`: PBES2 with AES-256 and an HMAC-SHA256 MAC, which current
/// browsers and `openssl pkcs12` read.
pub fn pkcs12(pair: &CertPair, ca_pem: &str, password: &str) -> Result<Vec<u8>, rcgen::Error> {
    let bad = |_| rcgen::Error::CouldNotParseCertificate;
    let leaf =
        p12_keystore::Certificate::from_der(&pem_certificate_der(&pair.cert_pem)?).map_err(bad)?;
    let ca = p12_keystore::Certificate::from_der(&pem_certificate_der(ca_pem)?).map_err(bad)?;
    let (_, key) = x509_parser::pem::parse_x509_pem(pair.key_pem.as_bytes())
        .map_err(|_| rcgen::Error::CouldNotParseKeyPair)?;
    let key = zeroize::Zeroizing::new(key.contents);
    let key =
        p12_keystore::PrivateKey::from_der(&key).map_err(|_| rcgen::Error::CouldNotParseKeyPair)?;
    let key_id: [u8; 20] = rand::random();
    let chain = p12_keystore::PrivateKeyChain::new(key_id.to_vec(), key, [leaf, ca]);
    let mut store = p12_keystore::KeyStore::new();
    store.add_entry(
        "credbroker admin",
        p12_keystore::KeyStoreEntry::PrivateKeyChain(chain),
    );
    store
        .writer(password)
        .write()
        .map_err(|_| rcgen::Error::CouldNotParseKeyPair)
}

fn write_file(path: &Path, contents: &str, secret: bool) -> io::Result<()> {
    write_bytes(path, contents.as_bytes(), secret)
}

fn write_bytes(path: &Path, contents: &[u8], secret: bool) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mode = if secret { 0o600 } else { 0o644 };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    // `mode` only applies to new files; an existing key file may be looser.
    file.set_permissions(std::fs::Permissions::from_mode(mode))?;
    file.write_all(contents)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_p12_holds_the_admin_key_and_chain_under_the_dev_password() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_dev_pki(dir.path()).unwrap();
        let p12 = dir.path().join("admin.p12");
        assert!(written.contains(&p12));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p12).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let bytes = std::fs::read(&p12).unwrap();
        assert!(
            p12_keystore::KeyStore::from_pkcs12(
                &bytes,
                "wrong",
                p12_keystore::Pkcs12ImportPolicy::Relaxed
            )
            .is_err(),
            "a wrong password must not open it"
        );
        let store = p12_keystore::KeyStore::from_pkcs12(
            &bytes,
            DEV_P12_PASSWORD,
            p12_keystore::Pkcs12ImportPolicy::Relaxed,
        )
        .unwrap();
        let (_, chain) = store.private_key_chain().expect("a key with its chain");
        let admin_pem = std::fs::read_to_string(dir.path().join("admin.pem")).unwrap();
        let ca_pem = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
        assert_eq!(
            chain.certs()[0].as_der(),
            pem_certificate_der(&admin_pem).unwrap()
        );
        assert_eq!(
            chain.certs()[1].as_der(),
            pem_certificate_der(&ca_pem).unwrap()
        );
        let key_pem = std::fs::read_to_string(dir.path().join("admin-key.pem")).unwrap();
        let (_, key) = x509_parser::pem::parse_x509_pem(key_pem.as_bytes()).unwrap();
        assert_eq!(chain.key().as_der(), key.contents.as_slice());
    }

    #[test]
    fn client_cert_carries_spiffe_uri_and_client_auth() {
        let ca = DevCa::generate("test CA").unwrap();
        let pair = ca
            .client_cert(&ClientSpec {
                serial: Some(4242),
                ..ClientSpec::spiffe(DEV_APP_ID)
            })
            .unwrap();
        let der = pem_certificate_der(&pair.cert_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        let uris: Vec<&str> = san
            .value
            .general_names
            .iter()
            .filter_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => Some(*uri),
                _ => None,
            })
            .collect();
        assert_eq!(uris, [DEV_APP_ID]);
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.client_auth && !eku.server_auth);
        assert_eq!(cert_serial(&pair.cert_pem), Some(4242));
    }

    #[test]
    fn loaded_ca_signs_like_the_original() {
        let ca = DevCa::generate("test CA").unwrap();
        let loaded = DevCa::load(&ca.cert_pem(), &ca.key_pem()).unwrap();
        let pair = loaded.client_cert(&ClientSpec::spiffe(DEV_APP_ID)).unwrap();
        let ca_der = pem_certificate_der(&ca.cert_pem()).unwrap();
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        let der = pem_certificate_der(&pair.cert_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(cert.issuer(), ca_cert.subject());

        let other = DevCa::generate("other CA").unwrap();
        assert!(DevCa::load(&ca.cert_pem(), &other.key_pem()).is_err());
    }
}
