//! The caller's identity, read from its verified client certificate.
//!
//! An identity has a kind, and the kind is part of its text (invariant 8,
//! "identities are typed"): `spiffe://td/path` comes only from the
//! certificate's one SPIFFE URI SAN, `dns:name` from its first DNS SAN,
//! `cn:name` from its subject CN — in that order of preference. Without the
//! kind, a CN that merely *looks* like a SPIFFE ID (internal CAs often let
//! teams choose their CN) would pass for one. rustls has already verified
//! the chain; this module only reads names.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::{Error, Result};

/// Longest DNS name or CN we accept; a longer one is almost surely an
/// attack on our logs and store rather than a real workload name.
const MAX_NAME_LEN: usize = 512;
/// The SPIFFE-ID spec: implementations must support 2048 bytes, and
/// should not generate longer ones.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;
/// RFC 3986 bounds a URI host, and so a trust domain, at 255 bytes.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// How much of a caller-chosen value an error message quotes.
const QUOTE_LEN: usize = 120;

/// Where an identity came from. Each kind is a namespace of its own: no
/// pattern of one kind matches an identity of another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IdentityKind {
    /// From the certificate's SPIFFE URI SAN; text `spiffe://td/path`.
    Spiffe,
    /// From the first DNS SAN (lowercased: DNS is case-insensitive); text
    /// `dns:name`.
    Dns,
    /// From the subject CN; text `cn:name`.
    Cn,
    /// The broker itself, or text read back from a store written before
    /// identities were typed. Never matches a pattern.
    Other,
}

impl IdentityKind {
    /// The prefix that marks the kind in the canonical text.
    pub fn prefix(self) -> &'static str {
        match self {
            IdentityKind::Spiffe => "spiffe://",
            IdentityKind::Dns => "dns:",
            IdentityKind::Cn => "cn:",
            IdentityKind::Other => "",
        }
    }

    /// The kind a canonical text is marked with, and the rest of it.
    fn split(text: &str) -> (IdentityKind, &str) {
        for kind in [IdentityKind::Spiffe, IdentityKind::Dns, IdentityKind::Cn] {
            if let Some(rest) = text.strip_prefix(kind.prefix()) {
                return (kind, rest);
            }
        }
        (IdentityKind::Other, text)
    }
}

/// A verified caller identity: its kind and its canonical text (kind
/// prefix included), which is what the store, the audit log and
/// `admin leases` show.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    kind: IdentityKind,
    text: String,
}

impl Identity {
    /// For callers that are the broker itself (reaper, start-up tasks).
    pub fn system() -> Self {
        Identity {
            kind: IdentityKind::Other,
            text: "credbroker:system".into(),
        }
    }

    /// The identity of a verified client certificate (DER): its SPIFFE ID,
    /// else its first DNS SAN, else its subject CN. A certificate with more
    /// than one SPIFFE URI SAN, or a `spiffe:` URI SAN that is not a valid
    /// SPIFFE ID, is refused rather than read by its DNS SAN or CN: falling
    /// back would let a broken SVID pass as another kind of name. URI SANs
    /// of other schemes are ignored.
    pub fn from_cert_der(der: &[u8]) -> Result<Self> {
        let unauthenticated = |m: String| Error::Unauthenticated(format!("client certificate {m}"));
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|_| unauthenticated("cannot be parsed".into()))?;
        let mut spiffe: Vec<&str> = Vec::new();
        let mut dns: Option<&str> = None;
        // A SAN extension we cannot read (malformed, or present twice) is
        // refused: skipping it would fall back to the CN.
        let san = cert.subject_alternative_name().map_err(|_| {
            unauthenticated("has subject alternative names that cannot be parsed".into())
        })?;
        if let Some(san) = san {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(uri) if has_spiffe_scheme(uri) => spiffe.push(uri),
                    GeneralName::DNSName(d) if dns.is_none() => dns = Some(d),
                    _ => {}
                }
            }
        }
        match spiffe.as_slice() {
            [] => {}
            [uri] => {
                return parse_spiffe_id(uri).map_err(|why| {
                    unauthenticated(format!("has SPIFFE ID {}: {why}", quote(uri)))
                });
            }
            many => {
                return Err(unauthenticated(format!(
                    "has {} SPIFFE URI SANs; an X.509-SVID carries exactly one",
                    many.len()
                )))
            }
        }
        if let Some(d) = dns {
            return dns_identity(d)
                .map_err(|why| unauthenticated(format!("has DNS SAN {}: {why}", quote(d))));
        }
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .map(|cn| cn.as_str())
            .ok_or_else(|| unauthenticated("has no SPIFFE ID, DNS name or CN".into()))?
            .map_err(|_| unauthenticated("has a CN that is not a readable string".into()))?;
        cn_identity(cn).map_err(|why| unauthenticated(format!("has CN {}: {why}", quote(cn))))
    }

    /// Parses the canonical text an admin types to select leases
    /// (`spiffe://…`, `dns:…`, `cn:…`). A bare name is refused with a hint,
    /// because it could only ever select nothing.
    pub fn parse(text: &str) -> Result<Self> {
        let invalid =
            |m: NameError| Error::InvalidArgument(format!("identity {}: {m}", quote(text)));
        if has_spiffe_scheme(text) {
            return parse_spiffe_id(text).map_err(invalid);
        }
        match IdentityKind::split(text) {
            (IdentityKind::Dns, name) => dns_identity(name).map_err(invalid),
            (IdentityKind::Cn, name) => cn_identity(name).map_err(invalid),
            _ => Err(Error::InvalidArgument(format!(
                "identity {}: {}",
                quote(text),
                no_kind_hint(text)
            ))),
        }
    }

    /// Wraps a canonical text read back from the store; its kind is read
    /// from its prefix, without validation (it was validated on the way in).
    pub fn from_trusted(s: impl Into<String>) -> Self {
        let text = s.into();
        let (kind, _) = IdentityKind::split(&text);
        Identity { kind, text }
    }

    pub fn kind(&self) -> IdentityKind {
        self.kind
    }

    /// The canonical text, kind prefix included.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The text after the kind prefix: the DNS name, the CN, or for a
    /// SPIFFE ID `td/path`.
    pub fn name(&self) -> &str {
        &self.text[self.kind.prefix().len()..]
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// What to write instead of a name without a kind, for errors that reach
/// operators (config) and admins (selectors).
pub fn no_kind_hint(bare: &str) -> String {
    format!(
        "has no kind; write {} (a DNS SAN) or {} (the subject CN)",
        quote(&format!("dns:{bare}")),
        quote(&format!("cn:{bare}"))
    )
}

/// Any URI whose scheme is `spiffe` in any case: the SPIFFE-ID spec wants
/// it lowercase, and an uppercase one must be refused as a broken SPIFFE
/// ID, not ignored as "some other URI".
pub fn has_spiffe_scheme(uri: &str) -> bool {
    uri.get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("spiffe:"))
}

/// Why a name cannot be an identity (a SPIFFE ID, trust domain, DNS SAN or
/// CN): lowercase text without the name. Its class is the reader's — a
/// certificate's makes it `Unauthenticated`, a typed one `InvalidArgument`
/// (`Identity::parse`), a pattern's a `policy::PatternError` — each adding
/// which name it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameError(String);

impl std::fmt::Display for NameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NameError {}

/// The text, for a reader that checks it (`e.contains(..)`).
impl std::ops::Deref for NameError {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl From<String> for NameError {
    fn from(m: String) -> Self {
        NameError(m)
    }
}

impl From<&str> for NameError {
    fn from(m: &str) -> Self {
        NameError(m.to_string())
    }
}

/// Checks a SPIFFE ID as the SPIFFE-ID and X.509-SVID specs define it:
/// scheme exactly `spiffe`, a trust domain of `[a-z0-9._-]` with no
/// userinfo or port, a non-empty path of segments of `[A-Za-z0-9._-]`
/// (no empty, `.` or `..` segment, no trailing `/`), no query or fragment,
/// at most 2048 bytes. The reason for a refusal is lowercase text.
pub fn parse_spiffe_id(uri: &str) -> std::result::Result<Identity, NameError> {
    if uri.len() > MAX_SPIFFE_ID_LEN {
        return Err(format!("longer than {MAX_SPIFFE_ID_LEN} bytes").into());
    }
    let rest = uri
        .strip_prefix("spiffe://")
        .ok_or("the scheme must be exactly \"spiffe\", followed by \"//\"")?;
    if rest.contains('?') {
        return Err("a SPIFFE ID has no query".into());
    }
    if rest.contains('#') {
        return Err("a SPIFFE ID has no fragment".into());
    }
    let (trust_domain, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    check_trust_domain(trust_domain)?;
    check_spiffe_path(path)?;
    Ok(Identity {
        kind: IdentityKind::Spiffe,
        text: uri.to_string(),
    })
}

/// A trust domain: the host part of the URI, `[a-z0-9._-]`, 1..=255 bytes.
pub fn check_trust_domain(td: &str) -> std::result::Result<(), NameError> {
    if td.is_empty() {
        return Err("the trust domain is empty".into());
    }
    if td.contains('@') {
        return Err("a trust domain has no userinfo".into());
    }
    if td.contains(':') {
        return Err("a trust domain has no port".into());
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(format!("the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes").into());
    }
    if td.bytes().any(|b| b.is_ascii_uppercase()) {
        return Err("the trust domain must be lowercase".into());
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b".-_".contains(&b))
    {
        return Err("the trust domain may only hold a-z, 0-9, '.', '-' and '_'".into());
    }
    Ok(())
}

/// A leaf SVID's path: non-empty (the X.509-SVID spec: "non-root"), each
/// segment non-empty, not `.` or `..`, of `[A-Za-z0-9._-]`.
fn check_spiffe_path(path: &str) -> std::result::Result<(), NameError> {
    if path.is_empty() || path == "/" {
        return Err("a workload's SPIFFE ID needs a path below the trust domain".into());
    }
    if path.ends_with('/') {
        return Err("the path ends with '/'".into());
    }
    for segment in path[1..].split('/') {
        match segment {
            "" => return Err("the path has an empty segment".into()),
            "." | ".." => return Err("the path has a '.' or '..' segment".into()),
            s if !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-_".contains(&b)) =>
            {
                return Err(
                    "path segments may only hold A-Z, a-z, 0-9, '.', '-' and '_' (no percent-encoding)"
                        .into(),
                )
            }
            _ => {}
        }
    }
    Ok(())
}

/// A DNS SAN as an identity: lowercased, since DNS names are
/// case-insensitive. Letters, digits, `.`, `-`, `_` and the `*` of a
/// wildcard; no `/`, so policy can treat labels as segments.
fn dns_identity(name: &str) -> std::result::Result<Identity, NameError> {
    if name.is_empty() {
        return Err("empty".into());
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("longer than {MAX_NAME_LEN} bytes").into());
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b".-_*".contains(&b))
    {
        return Err("not a DNS name (letters, digits, '.', '-', '_', '*')".into());
    }
    Ok(Identity {
        kind: IdentityKind::Dns,
        text: format!("dns:{}", name.to_ascii_lowercase()),
    })
}

/// A subject CN as an identity, exactly as written (CNs are free text).
fn cn_identity(cn: &str) -> std::result::Result<Identity, NameError> {
    if cn.is_empty() {
        return Err("empty".into());
    }
    if cn.len() > MAX_NAME_LEN {
        return Err(format!("longer than {MAX_NAME_LEN} bytes").into());
    }
    if cn.chars().any(char::is_control) {
        return Err("has control characters".into());
    }
    Ok(Identity {
        kind: IdentityKind::Cn,
        text: format!("cn:{cn}"),
    })
}

/// A caller- or operator-chosen value for an error message: escaped (no
/// control characters reach a log) and cut short.
fn quote(s: &str) -> String {
    if s.len() <= QUOTE_LEN {
        return format!("{s:?}");
    }
    let mut end = QUOTE_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use credbroker_testkit::pki::{ClientSpec, DevCa};

    fn der(pem: &str) -> Vec<u8> {
        x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .unwrap()
            .1
            .contents
    }

    fn identity_of(spec: &ClientSpec) -> Result<Identity> {
        let ca = DevCa::generate("test CA").unwrap();
        Identity::from_cert_der(&der(&ca.client_cert(spec).unwrap().cert_pem))
    }

    #[test]
    fn valid_spiffe_ids_parse() {
        for id in [
            "spiffe://credbroker.dev/ns/demo/app",
            "spiffe://a/b",
            "spiffe://x-y_z.0/A.b-c_D/9",
        ] {
            let i = parse_spiffe_id(id).unwrap();
            assert_eq!(i.kind(), IdentityKind::Spiffe);
            assert_eq!(i.as_str(), id);
        }
        let longest = format!("spiffe://td/{}", "a".repeat(MAX_SPIFFE_ID_LEN - 12));
        assert!(parse_spiffe_id(&longest).is_ok());
        assert!(parse_spiffe_id(&format!("{longest}a")).is_err());
    }

    #[test]
    fn invalid_spiffe_ids_say_why() {
        for (id, why) in [
            ("SPIFFE://td/x", "scheme"),
            ("spiffe:td/x", "scheme"),
            ("spiffe://TD/x", "lowercase"),
            ("spiffe:///x", "trust domain is empty"),
            ("spiffe://td", "needs a path"),
            ("spiffe://td/", "needs a path"),
            ("spiffe://td/a/", "ends with '/'"),
            ("spiffe://td//a", "empty segment"),
            ("spiffe://td/a/../b", "'..'"),
            ("spiffe://td/./b", "'.'"),
            ("spiffe://td/a?x=1", "query"),
            ("spiffe://td/a#f", "fragment"),
            ("spiffe://user@td/a", "userinfo"),
            ("spiffe://td:8443/a", "port"),
            ("spiffe://t%64/a", "may only hold"),
            ("spiffe://td/a%2Fb", "percent"),
            ("spiffe://td/a b", "may only hold"),
        ] {
            let err = parse_spiffe_id(id).unwrap_err();
            assert!(err.contains(why), "{id}: {err}");
        }
        let long_td = format!("spiffe://{}/a", "t".repeat(256));
        assert!(parse_spiffe_id(&long_td).unwrap_err().contains("255"));
    }

    #[test]
    fn kinds_come_from_where_the_name_was_found() {
        let cn = identity_of(&ClientSpec::common_name("spiffe://credbroker.dev/dba/x")).unwrap();
        assert_eq!(cn.kind(), IdentityKind::Cn);
        assert_eq!(cn.as_str(), "cn:spiffe://credbroker.dev/dba/x");
        let dns = identity_of(&ClientSpec::dns("Billing.Internal")).unwrap();
        assert_eq!(dns.kind(), IdentityKind::Dns);
        assert_eq!(dns.as_str(), "dns:billing.internal");
        assert_eq!(dns.name(), "billing.internal");
        let spiffe = identity_of(&ClientSpec {
            dns_name: Some("billing.internal".into()),
            ..ClientSpec::spiffe("spiffe://credbroker.dev/ns/demo/app")
        })
        .unwrap();
        assert_eq!(spiffe.as_str(), "spiffe://credbroker.dev/ns/demo/app");
        // A non-SPIFFE URI SAN is no identity: the DNS SAN is used.
        let https = identity_of(&ClientSpec {
            extra_uris: vec!["https://billing.internal/x".into()],
            ..ClientSpec::dns("billing.internal")
        })
        .unwrap();
        assert_eq!(https.as_str(), "dns:billing.internal");
    }

    #[test]
    fn broken_or_doubled_spiffe_ids_are_refused_not_skipped() {
        let two = identity_of(&ClientSpec {
            extra_uris: vec!["spiffe://credbroker.dev/dba/x".into()],
            ..ClientSpec::spiffe("spiffe://credbroker.dev/ns/demo/app")
        })
        .unwrap_err();
        assert!(
            matches!(&two, Error::Unauthenticated(m) if m.contains("2 SPIFFE URI SANs")),
            "{two}"
        );
        let bad = identity_of(&ClientSpec {
            dns_name: Some("billing.internal".into()),
            ..ClientSpec::spiffe("spiffe://credbroker.dev/a/../b")
        })
        .unwrap_err();
        assert!(
            matches!(&bad, Error::Unauthenticated(m) if m.contains("'..'")),
            "{bad}"
        );
    }

    #[test]
    fn selectors_need_a_kind() {
        assert_eq!(
            Identity::parse("dns:Billing.internal").unwrap().as_str(),
            "dns:billing.internal"
        );
        assert_eq!(
            Identity::parse("cn:legacy-batch").unwrap().kind(),
            IdentityKind::Cn
        );
        assert!(Identity::parse("spiffe://td/a/../b").is_err());
        let err = Identity::parse("billing.internal").unwrap_err().to_string();
        assert!(
            err.contains(r#"write "dns:billing.internal" (a DNS SAN) or "cn:billing.internal""#),
            "{err}"
        );
        assert_eq!(Identity::from_trusted("cn:x").kind(), IdentityKind::Cn);
        assert_eq!(
            Identity::from_trusted("billing.internal").kind(),
            IdentityKind::Other
        );
    }
}
