//! Hand-written `Debug` for the generated protobuf types that carry a
//! password: prost's derive would print it to any log or panic message
//! that formats a reply. build.rs turns the derive off for these.

use std::fmt;

use crate::pb;

fn redacted(s: &str) -> &'static str {
    if s.is_empty() {
        ""
    } else {
        "<redacted>"
    }
}

/// `impl Debug` printing each named field, a field marked `(redacted)`
/// only as whether it is set; one table per type below. (Brace-delimited,
/// so rustfmt leaves the tables as written.)
macro_rules! debug_with_secrets {
    ($ty:ty as $name:literal: $($field:ident $(($wrap:ident))?),* $(,)?) => {
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut d = f.debug_struct($name);
                $(d.field(stringify!($field), &$($wrap)?(&self.$field));)*
                d.finish()
            }
        }
    };
}

// The DSN holds the password too.
debug_with_secrets! {
    pb::Lease as "Lease": lease_id, role, database, kind, username, password(redacted),
    dsn(redacted), host, port, database_name, issued_at, expires_at, max_expires_at, renewable,
    identity, state,
}

debug_with_secrets! {
    pb::StaticCredential as "StaticCredential": static_role, database, kind, username,
    password(redacted), dsn(redacted), host, port, database_name, generation, rotated_at,
    next_rotation_at, valid_until,
}

#[cfg(test)]
mod tests {
    use crate::pb;

    /// What the test's password `hunter2…` was set in is redacted, and the
    /// rest (`named`) still shows.
    fn shows_no_password(shown: String, named: &str) {
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains(named) && shown.contains("<redacted>"),
            "{shown}"
        );
    }

    #[test]
    fn a_lease_and_every_reply_holding_one_print_no_password() {
        let lease = pb::Lease {
            lease_id: "l_abc".into(),
            username: "cb_app_x".into(),
            password: "hunter2hunter2".into(),
            dsn: "postgresql://cb_app_x:hunter2hunter2@h:5432/d".into(),
            ..Default::default()
        };
        shows_no_password(format!("{lease:?} {lease:#?}"), "l_abc");
        let reply = tonic::Response::new(lease);
        assert!(!format!("{reply:?}").contains("hunter2"));
    }

    #[test]
    fn a_static_credential_prints_no_password() {
        let c = pb::StaticCredential {
            static_role: "orders".into(),
            username: "app_a".into(),
            password: "hunter2hunter2".into(),
            dsn: "postgresql://app_a:hunter2hunter2@h:5432/d".into(),
            ..Default::default()
        };
        shows_no_password(format!("{c:?} {c:#?}"), "app_a");
    }
}
