//! The two forms of a PostgreSQL connection string, a URL and key=value
//! words, read into the same decoded key/value pairs, in order.

use percent_encoding::percent_decode_str;

use super::{is_url, ConnStrError, Result};

/// The key/value pairs of either form, decoded, in order.
pub(super) fn pairs(s: &str) -> Result<Vec<(String, String)>> {
    if is_url(s) {
        url_pairs(s)
    } else if s.contains("://") {
        let scheme = s.split("://").next().unwrap_or("");
        Err(format!(
            "scheme {scheme:?}: expected postgres:// or postgresql:// (or key=value words)"
        )
        .into())
    } else {
        keyword_pairs(s)
    }
}

fn decode(what: &str, raw: &str) -> Result<String> {
    percent_decode_str(raw)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| format!("{what}: not UTF-8 after percent-decoding").into())
}

/// `1st`, `2nd`, … for "the 2nd of 3 hosts".
pub(super) fn nth(i: usize) -> String {
    let n = i + 1;
    let suffix = match (n % 10, n % 100) {
        (1, 11) | (2, 12) | (3, 13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// `postgres://[user[:password]@][host[:port][,host[:port]…]][/dbname][?k=v&…]`
fn url_pairs(s: &str) -> Result<Vec<(String, String)>> {
    let rest = s.split_once("://").map_or(s, |(_, r)| r);
    let (before_query, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (authority, path) = match before_query.find('/') {
        Some(i) => (&before_query[..i], &before_query[i + 1..]),
        None => (before_query, ""),
    };
    let mut out = Vec::new();
    // Host names hold no '@'; a user name holds it only percent-encoded.
    let hostlist = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, password) = match userinfo.split_once(':') {
                Some((u, p)) => (u, Some(p)),
                None => (userinfo, None),
            };
            if password.is_some_and(|p| !p.is_empty()) {
                return Err(ConnStrError::Password);
            }
            if !user.is_empty() {
                out.push(("user".to_string(), decode("user", user)?));
            }
            hosts
        }
        None => authority,
    };
    if !hostlist.is_empty() {
        let chunks: Vec<&str> = hostlist.split(',').collect();
        let n = chunks.len();
        let mut hosts = Vec::new();
        let mut ports = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let which = if n == 1 {
                format!("host {chunk:?}")
            } else {
                format!("the {} of {n} hosts, {chunk:?},", nth(i))
            };
            let (host, port) = if let Some(inner) = chunk.strip_prefix('[') {
                let Some((addr, after)) = inner.split_once(']') else {
                    return Err(format!("{which} lacks the ']' closing its IPv6 address").into());
                };
                let port = match after {
                    "" => None,
                    p => Some(
                        p.strip_prefix(':')
                            .ok_or_else(|| format!("{which}: expected \":PORT\" after the ']'"))?,
                    ),
                };
                (addr.to_string(), port)
            } else {
                match chunk.split_once(':') {
                    Some((_, p)) if p.contains(':') => {
                        return Err(format!(
                            "{which}: an IPv6 address goes in brackets, like [::1]:5432"
                        )
                        .into())
                    }
                    Some((h, p)) => (decode("host", h)?, Some(p)),
                    None => (decode("host", chunk)?, None),
                }
            };
            if host.is_empty() {
                return Err(format!("{which} names no host").into());
            }
            let port = match port {
                None => "5432".to_string(),
                Some(p) => {
                    parse_port(p).ok_or_else(|| {
                        format!("{which}: port {p:?} is not a port number (1-65535)")
                    })?;
                    p.to_string()
                }
            };
            hosts.push(host);
            ports.push(port);
        }
        out.push(("host".to_string(), hosts.join(",")));
        out.push(("port".to_string(), ports.join(",")));
    }
    if !path.is_empty() {
        out.push(("dbname".to_string(), decode("dbname", path)?));
    }
    for segment in query.split('&').filter(|s| !s.is_empty()) {
        let Some((k, v)) = segment.split_once('=') else {
            return Err(format!("parameter {segment:?}: expected key=value").into());
        };
        let key = decode("a parameter name", k)?;
        let value = decode(&key, v)?;
        out.push((key, value));
    }
    Ok(out)
}

/// libpq's `key = value` words: values may be single-quoted, and a
/// backslash escapes the next character in either kind of value.
fn keyword_pairs(s: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut it = s.chars().peekable();
    loop {
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.peek().is_none() {
            break;
        }
        let mut key = String::new();
        while let Some(&c) = it.peek() {
            if c.is_whitespace() || c == '=' {
                break;
            }
            key.push(c);
            it.next();
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if key.is_empty() {
            return Err("a \"=\" with no key before it: expected key=value words"
                .to_string()
                .into());
        }
        if it.next() != Some('=') {
            return Err(format!(
                "{key:?}: expected key=value (no \"=\" after it); a URL starts with postgres://"
            )
            .into());
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        let mut value = String::new();
        if it.peek() == Some(&'\'') {
            it.next();
            let mut closed = false;
            while let Some(c) = it.next() {
                match c {
                    '\'' => {
                        closed = true;
                        break;
                    }
                    '\\' => value.extend(it.next()),
                    c => value.push(c),
                }
            }
            if !closed {
                return Err(format!("{key}: the quoted value has no closing '").into());
            }
        } else {
            while let Some(&c) = it.peek() {
                if c.is_whitespace() {
                    break;
                }
                it.next();
                if c == '\\' {
                    value.extend(it.next());
                } else {
                    value.push(c);
                }
            }
        }
        out.push((key, value));
    }
    if out.is_empty() {
        return Err("empty: expected postgres://… or key=value words"
            .to_string()
            .into());
    }
    Ok(out)
}

pub(super) fn parse_port(p: &str) -> Option<u16> {
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    p.parse::<u16>().ok().filter(|&n| n > 0)
}
