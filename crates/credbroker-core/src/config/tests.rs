use super::*;
use proptest::strategy::Strategy;

const SAMPLE: &str = r#"
admins = ["spiffe://example.org/dba/*"]
[server]
listen = "127.0.0.1:7443"
metrics_listen = "127.0.0.1:9464"
[tls]
cert = "pki/server.pem"
key = "pki/server-key.pem"
client_ca = "pki/ca.pem"
[store]
url = "sqlite://credbroker.db"
[audit]
path = "audit.log"
[databases.orders]
kind = "postgres"
admin_url = "postgres://broker_admin@127.0.0.1:5432/orders"
admin_password_file = "secrets/orders-admin"
[roles.orders-readonly]
database = "orders"
default_ttl = "15m"
max_ttl = "1h"
allowed = ["spiffe://example.org/ns/shop/*"]
grants = ["GRANT SELECT ON ALL TABLES IN SCHEMA public TO {{name}}"]
"#;

#[test]
fn store_urls_are_one_of_two_kinds() {
    let base = Path::new("/etc/credbroker");
    assert_eq!(
        StoreUrl::parse("sqlite://leases.db", base).unwrap(),
        StoreUrl::Sqlite(PathBuf::from("/etc/credbroker/leases.db"))
    );
    let pg = StoreUrl::parse("postgresql://cb@store/leases", base).unwrap();
    assert!(pg.is_shared());
    for (url, says) in [
        (
            "mysql://cb@store/leases",
            "expected sqlite://PATH, postgres://",
        ),
        (
            "postgres://cb:secret@store/leases",
            "must not contain a password",
        ),
        ("leases.db", "expected sqlite://PATH"),
    ] {
        let err = StoreUrl::parse(url, base).unwrap_err().to_string();
        assert!(err.contains(says), "{url}: {err}");
        assert!(!err.contains("secret"), "{err}");
    }
}

/// Issue 28: libpq's forms for the store and a PostgreSQL admin_url
/// (several hosts, key=value), each mistake named under its config
/// key; MySQL keeps one host and says so.
#[test]
fn store_and_admin_urls_take_libpq_forms() {
    let multi = "postgres://cb@db1:5432,db2:5433/leases?target_session_attrs=read-write";
    let kv = "host=db1,db2 port=5432 dbname=orders user=broker_admin \
              target_session_attrs=read-write sslmode=verify-full sslrootcert=pki/ca.pem";
    let text = SAMPLE
        .replace(
            "url = \"sqlite://credbroker.db\"",
            &format!("url = \"{multi}\""),
        )
        .replace(
            "\"postgres://broker_admin@127.0.0.1:5432/orders\"",
            &format!("\"{kv}\""),
        );
    let c = Config::parse(&text, Path::new("/etc/credbroker")).unwrap();
    assert_eq!(c.store.url.to_string(), multi);
    let admin = &c.databases["orders"].admin_url;
    assert!(
        admin.contains("sslrootcert='/etc/credbroker/pki/ca.pem'"),
        "{admin}"
    );
    let parsed = connstr::parse(admin).unwrap();
    assert_eq!(parsed.hosts_label(), "db1:5432, db2:5432");
    for (store, want) in [
        (
            "postgres://cb@db1:5432,db2:x/leases",
            "store.url: the 2nd of 2 hosts, \"db2:x\",: port \"x\" is not a port number",
        ),
        (
            "host=db1,db2 port=1,2,3 dbname=leases",
            "store.url: port: 3 ports for 2 hosts",
        ),
        (
            "host=db1 dbname=leases password=hunter2",
            "store.url: must not contain a password; use store.password_file",
        ),
        (
            "postgres://cb@db1/leases?target_session_attrs=standby",
            "store.url: target_session_attrs=\"standby\": not supported",
        ),
    ] {
        let text = SAMPLE.replace(
            "url = \"sqlite://credbroker.db\"",
            &format!("url = \"{store}\""),
        );
        let e = Config::parse(&text, Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{store}: {e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
    for (admin, want) in [
        (
            "host=db1,db2 dbname=orders user=broker_admin keepalives=on",
            "databases.orders.admin_url: keepalives=\"on\": expected 0 or 1",
        ),
        (
            "postgres://broker_admin@db1,db2/orders?sslmod=require",
            "databases.orders.admin_url: \"sslmod\": not a libpq connection parameter",
        ),
        (
            "mysql://broker_admin@db1/orders",
            "scheme \"mysql\" does not match kind \"postgres\"",
        ),
    ] {
        let text = SAMPLE.replace(
            "\"postgres://broker_admin@127.0.0.1:5432/orders\"",
            &format!("\"{admin}\""),
        );
        let e = Config::parse(&text, Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{admin}: {e}");
    }
    let mysql = SAMPLE
        .replace("kind = \"postgres\"", "kind = \"mysql\"")
        .replace(
            "\"postgres://broker_admin@127.0.0.1:5432/orders\"",
            "\"mysql://broker_admin@db1:3306,db2:3306/orders\"",
        );
    let e = Config::parse(&mysql, Path::new("/"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("databases.orders.admin_url: \"db1:3306,db2:3306\" names several hosts, but a MySQL admin_url takes one"),
        "{e}"
    );
}

#[test]
fn sample_parses_and_resolves_paths() {
    let c = Config::parse(SAMPLE, Path::new("/etc/credbroker")).unwrap();
    assert_eq!(c.tls.cert, Path::new("/etc/credbroker/pki/server.pem"));
    assert_eq!(
        c.store.url.to_string(),
        "sqlite:///etc/credbroker/credbroker.db"
    );
    let r = c.role("orders-readonly").unwrap();
    assert_eq!(r.max_ttl, Duration::from_secs(3600));
    assert_eq!(c.databases["orders"].scram_iterations, 1);
}

#[test]
fn webhook_ca_file_is_optional_and_relative_to_the_config() {
    let c = Config::parse(SAMPLE, Path::new("/etc/credbroker")).unwrap();
    assert_eq!(c.server.webhook_ca_file, None);
    let with = SAMPLE.replace(
        "metrics_listen = \"127.0.0.1:9464\"\n",
        "metrics_listen = \"127.0.0.1:9464\"\nwebhook_ca_file = \"pki/chat-ca.pem\"\n",
    );
    assert_ne!(with, SAMPLE);
    let c = Config::parse(&with, Path::new("/etc/credbroker")).unwrap();
    assert_eq!(
        c.server.webhook_ca_file.as_deref(),
        Some(Path::new("/etc/credbroker/pki/chat-ca.pem"))
    );
}

#[test]
fn listener_share_keys_default_to_a_fraction_of_the_cap_and_refuse_mistakes() {
    let c = Config::parse(SAMPLE, Path::new("/")).unwrap();
    assert_eq!(c.server.request_timeout, Duration::from_secs(10));
    assert_eq!(c.server.max_connections, 1024);
    assert_eq!(c.server.max_connections_per_identity, 128);
    assert_eq!(c.server.max_connections_per_source, 128);
    assert_eq!(c.server.ipv6_source_prefix, 64);
    let with = |keys: &str| {
        Config::parse(
            &SAMPLE.replacen("[server]\n", &format!("[server]\n{keys}\n"), 1),
            Path::new("/"),
        )
    };
    // The shares follow a changed cap unless set.
    let c = with("max_connections = 80").unwrap();
    assert_eq!(
        (
            c.server.max_connections_per_identity,
            c.server.max_connections_per_source
        ),
        (10, 10)
    );
    let c = with(
        "request_timeout = \"3s\"\nmax_connections_per_identity = 4\n\
         max_connections_per_source = 6\nipv6_source_prefix = 56",
    )
    .unwrap();
    assert_eq!(c.server.request_timeout, Duration::from_secs(3));
    assert_eq!(
        (
            c.server.max_connections_per_identity,
            c.server.max_connections_per_source,
            c.server.ipv6_source_prefix
        ),
        (4, 6, 56)
    );
    for (keys, says) in [
        ("request_timeout = \"0s\"", "server.request_timeout"),
        ("request_timeout = \"soon\"", "server.request_timeout"),
        ("max_connections = 0", "server.max_connections"),
        (
            "max_connections = 10\nmax_connections_per_identity = 11",
            "server.max_connections_per_identity",
        ),
        (
            "max_connections_per_source = 0",
            "server.max_connections_per_source",
        ),
        ("ipv6_source_prefix = 129", "server.ipv6_source_prefix"),
        ("ipv6_source_prefix = 8", "server.ipv6_source_prefix"),
    ] {
        let err = with(keys).unwrap_err().to_string();
        assert!(err.contains(says), "{keys}: {err}");
    }
}

#[test]
fn vault_api_section_defaults_and_mistakes() {
    let c = Config::parse(SAMPLE, Path::new("/")).unwrap();
    assert!(c.vault_api.is_none(), "off unless configured");
    let with =
        |section: &str| Config::parse(&format!("{SAMPLE}[vault_api]\n{section}"), Path::new("/"));
    let v = with("listen = \"127.0.0.1:8200\"\n")
        .unwrap()
        .vault_api
        .unwrap();
    assert_eq!(v.listen, "127.0.0.1:8200".parse().unwrap());
    assert_eq!(v.mount, "database");
    assert_eq!(v.token_ttl, Duration::from_secs(3600));
    assert_eq!(v.token_max_ttl, Duration::from_secs(86400));
    assert_eq!(v.max_tokens_per_identity, 32);
    assert!(
        v.token_cache,
        "the verified-token cache is on unless turned off"
    );
    let v = with("listen = \"127.0.0.1:8200\"\nmax_tokens_per_identity = 1\ntoken_cache = false\n")
        .unwrap()
        .vault_api
        .unwrap();
    assert_eq!(v.max_tokens_per_identity, 1);
    assert!(!v.token_cache);
    let v = with("listen = \"127.0.0.1:8200\"\nmount = \"db-prod\"\ntoken_ttl = \"10m\"\n")
        .unwrap()
        .vault_api
        .unwrap();
    assert_eq!(
        (v.mount.as_str(), v.token_ttl),
        ("db-prod", Duration::from_secs(600))
    );
    for (section, want) in [
        ("listen = \"nowhere\"\n", "vault_api.listen"),
        ("listen = \"127.0.0.1:7443\"\n", "is server.listen too"),
        (
            "listen = \"127.0.0.1:9464\"\n",
            "is server.metrics_listen too",
        ),
        (
            "listen = \"127.0.0.1:8200\"\nmount = \"a/b\"\n",
            "vault_api.mount",
        ),
        (
            "listen = \"127.0.0.1:8200\"\nmount = \"sys\"\n",
            "Vault reserves",
        ),
        (
            "listen = \"127.0.0.1:8200\"\ntoken_ttl = \"soon\"\n",
            "not a duration",
        ),
        (
            "listen = \"127.0.0.1:8200\"\ntoken_ttl = \"2h\"\ntoken_max_ttl = \"1h\"\n",
            "shorter than",
        ),
        (
            "listen = \"127.0.0.1:8200\"\ntoken = \"x\"\n",
            "unknown field",
        ),
        (
            "listen = \"127.0.0.1:8200\"\nmax_tokens_per_identity = 0\n",
            "vault_api.max_tokens_per_identity = 0: use 1 to 10000",
        ),
        (
            "listen = \"127.0.0.1:8200\"\nmax_tokens_per_identity = -3\n",
            "vault_api.max_tokens_per_identity = -3",
        ),
        (
            "listen = \"127.0.0.1:8200\"\nmax_tokens_per_identity = 10001\n",
            "use 1 to 10000",
        ),
        (
            "listen = \"127.0.0.1:8200\"\nmax_tokens_per_identity = \"many\"\n",
            "max_tokens_per_identity",
        ),
        (
            "listen = \"127.0.0.1:8200\"\ntoken_cache = \"off\"\n",
            "token_cache",
        ),
    ] {
        let err = with(section).unwrap_err().to_string();
        assert!(err.contains(want), "{section:?}: {err}");
    }
}

#[test]
fn design_sample_with_admins_after_audit_still_works() {
    let text = SAMPLE
        .replace("admins = [\"spiffe://example.org/dba/*\"]\n", "")
        .replace(
            "path = \"audit.log\"\n",
            "path = \"audit.log\"\nadmins = [\"spiffe://example.org/dba/*\"]\n",
        );
    let c = Config::parse(&text, Path::new("/")).unwrap();
    assert_eq!(c.admins.len(), 1);
}

#[test]
fn mistakes_are_clear_errors() {
    let cases = [
        (
            "max_ttl = \"1h\"",
            "max_ttl = \"1 fortnight\"",
            "not a duration",
        ),
        (
            "database = \"orders\"",
            "database = \"nope\"",
            "no [databases.nope]",
        ),
        (
            "default_ttl = \"15m\"",
            "default_ttl = \"2h\"",
            "exceeds max_ttl",
        ),
        (
            "@127.0.0.1",
            ":hunter2@127.0.0.1",
            "must not contain a password",
        ),
        (
            "kind = \"postgres\"",
            "kind = \"oracle\"",
            "unknown database kind",
        ),
        ("TO {{name}}", "TO someone", "does not mention"),
        (
            "listen = \"127.0.0.1:7443\"",
            "listen = \"nowhere\"",
            "server.listen",
        ),
        ("[store]", "[stor]", "unknown field"),
    ];
    for (from, to, want) in cases {
        let text = SAMPLE.replace(from, to);
        let err = Config::parse(&text, Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{to}: {err}");
        assert!(!err.contains("hunter2"), "{err}");
        // The class is said once, at the start.
        assert_eq!(err.matches("config: ").count(), 1, "{err}");
    }
}
/// `admins` written below a table reads as that table's field; the
/// error says to move it up.
#[test]
fn a_top_level_key_below_a_table_is_told_to_move_up() {
    let line = "admins = [\"spiffe://example.org/dba/*\"]\n";
    let text = format!("{}{line}", SAMPLE.replacen(line, "", 1));
    let err = Config::parse(&text, Path::new("/"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown field `admins`"), "{err}");
    assert!(
        err.contains("`admins` is a top-level key: move it above the first [table]"),
        "{err}"
    );
    // Another unknown field gets no such hint.
    let err = Config::parse(&SAMPLE.replace("[store]", "[stor]"), Path::new("/"))
        .unwrap_err()
        .to_string();
    assert!(!err.contains("top-level key"), "{err}");
}

#[test]
fn console_section_is_optional_checked_and_needs_a_port_of_its_own() {
    assert!(Config::parse(SAMPLE, Path::new("/"))
        .unwrap()
        .console
        .is_none());
    let with = |section: &str| Config::parse(&format!("{SAMPLE}\n{section}"), Path::new("/"));
    let c = with("[console]\nlisten = \"127.0.0.1:7444\"\n").unwrap();
    assert_eq!(c.console.unwrap().listen, "127.0.0.1:7444".parse().unwrap());
    for (section, want) in [
        (
            "[console]\nlisten = \"localhost\"\n",
            "console.listen \"localhost\"",
        ),
        (
            "[console]\nlisten = \"127.0.0.1:7443\"\n",
            "already used by [server]",
        ),
        (
            "[console]\nlisten = \"127.0.0.1:7444\"\nport = 1\n",
            "unknown field",
        ),
        ("[console]\n", "missing field `listen`"),
    ] {
        let err = with(section).unwrap_err().to_string();
        assert!(err.contains(want), "{section}: {err}");
    }
}

#[test]
fn identity_patterns_without_a_kind_say_what_to_write() {
    let text = SAMPLE.replace(
        "allowed = [\"spiffe://example.org/ns/shop/*\"]",
        "allowed = [\"billing.internal\"]",
    );
    let err = Config::parse(&text, Path::new("/"))
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        r#"config: roles.orders-readonly.allowed: identity pattern "billing.internal" has no kind; write "dns:billing.internal" (a DNS SAN) or "cn:billing.internal" (the subject CN)"#
    );
    let text = SAMPLE.replace("spiffe://example.org/dba/*", "ops-*");
    let err = Config::parse(&text, Path::new("/"))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("config: admins: identity pattern \"ops-*\" has no kind"),
        "{err}"
    );
    let text = SAMPLE.replace("spiffe://example.org/dba/*", "spiffe://Example.org/dba/*");
    let err = Config::parse(&text, Path::new("/"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("admins:") && err.contains("lowercase"),
        "{err}"
    );
    let text = SAMPLE.replace(
        "allowed = [\"spiffe://example.org/ns/shop/*\"]",
        "allowed = [\"dns:billing.internal\", \"cn:legacy-batch\"]",
    );
    let c = Config::parse(&text, Path::new("/")).unwrap();
    assert_eq!(c.role("orders-readonly").unwrap().allowed.len(), 2);
}

#[test]
fn postgres_store_takes_its_password_from_a_file_and_a_claim_timeout() {
    let text = SAMPLE.replace(
        "url = \"sqlite://credbroker.db\"",
        "url = \"postgres://cb@store:5432/leases\"\npassword_file = \"secrets/store\"\nclaim_timeout = \"15s\"",
    );
    let c = Config::parse(&text, Path::new("/etc/credbroker")).unwrap();
    assert_eq!(c.store.url.to_string(), "postgres://cb@store:5432/leases");
    assert_eq!(
        c.store.password,
        SecretSource::File("/etc/credbroker/secrets/store".into())
    );
    assert_eq!(c.store.claim_timeout, Duration::from_secs(15));
    assert_eq!(
        Config::parse(SAMPLE, Path::new("/"))
            .unwrap()
            .store
            .claim_timeout,
        Duration::from_secs(60)
    );
    for (from, to, want) in [
        (
            "url = \"sqlite://credbroker.db\"",
            "url = \"postgres://cb:hunter2@store/leases\"",
            "must not contain a password",
        ),
        (
            "url = \"sqlite://credbroker.db\"",
            "url = \"sqlite://credbroker.db\"\npassword_env = \"X\"",
            "only apply to a postgres",
        ),
        (
            "url = \"sqlite://credbroker.db\"",
            "url = \"sqlite://credbroker.db\"\nclaim_timeout = \"10ms\"",
            "at least 1s",
        ),
        (
            "url = \"sqlite://credbroker.db\"",
            "url = \"sqlite://credbroker.db\"\nprune_interval = \"0s\"",
            "at least 1s",
        ),
        (
            "url = \"sqlite://credbroker.db\"",
            "url = \"sqlite://credbroker.db\"\nretention = \"a week\"",
            "store.retention",
        ),
    ] {
        let err = Config::parse(&SAMPLE.replace(from, to), Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{to}: {err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}

#[test]
fn tls_parameters_in_urls_are_checked_and_their_paths_resolved() {
    let text = SAMPLE
        .replace(
            "127.0.0.1:5432/orders\"",
            "db.internal:5432/orders?sslmode=verify-full&sslrootcert=pki/db-ca.pem\"\nclient_sslmode = \"verify-full\"\nclient_sslrootcert = \"/etc/ssl/db-ca.pem\"",
        )
        .replace(
            "url = \"sqlite://credbroker.db\"",
            "url = \"postgres://cb@store/leases?sslmode=require&sslrootcert=store-ca.pem\"",
        );
    let c = Config::parse(&text, Path::new("/etc/credbroker")).unwrap();
    let db = &c.databases["orders"];
    assert_eq!(
        db.admin_url,
        "postgres://broker_admin@db.internal:5432/orders?sslmode=verify-full&sslrootcert=/etc/credbroker/pki/db-ca.pem"
    );
    assert_eq!(db.client_sslmode, Some(SslMode::VerifyFull));
    assert_eq!(db.client_sslrootcert.as_deref(), Some("/etc/ssl/db-ca.pem"));
    assert_eq!(
        c.store.url.to_string(),
        "postgres://cb@store/leases?sslmode=require&sslrootcert=/etc/credbroker/store-ca.pem"
    );
    for (from, to, want) in [
        (
            "/orders\"",
            "/orders?sslmode=verify\"",
            "databases.orders.admin_url: sslmode",
        ),
        (
            "/orders\"",
            "/orders?sslmode=verify-full\"",
            "needs sslrootcert",
        ),
        (
            "admin_password_file",
            "client_sslmode = \"sometimes\"\nadmin_password_file",
            "client_sslmode",
        ),
        (
            "admin_password_file",
            "client_sslrootcert = \"/ca.pem\"\nadmin_password_file",
            "set client_sslmode too",
        ),
        (
            "url = \"sqlite://credbroker.db\"",
            "url = \"postgres://cb@store/leases?sslmode=verify-ca\"",
            "store.url: sslmode=verify-ca needs sslrootcert",
        ),
    ] {
        let err = Config::parse(&SAMPLE.replace(from, to), Path::new("/"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(want), "{to}: {err}");
    }
}

#[test]
fn store_retention_and_prune_interval_default_and_parse() {
    let c = Config::parse(SAMPLE, Path::new("/")).unwrap();
    assert_eq!(c.store.retention, Duration::from_secs(7 * 24 * 3600));
    assert_eq!(c.store.prune_interval, Duration::from_secs(600));
    let text = SAMPLE.replace(
        "url = \"sqlite://credbroker.db\"",
        "url = \"sqlite://credbroker.db\"\nretention = \"36h\"\nprune_interval = \"1s\"",
    );
    let c = Config::parse(&text, Path::new("/")).unwrap();
    assert_eq!(c.store.retention, Duration::from_secs(36 * 3600));
    assert_eq!(c.store.prune_interval, Duration::from_secs(1));
}

proptest::proptest! {
    // The parser sees operator text and, on SIGHUP, a half-edited file:
    // whatever it gets, it answers Ok or a Config error, never a panic.
    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        let _ = Config::parse(&text, Path::new("/etc/credbroker"));
    }

    #[test]
    fn any_value_in_any_field_of_a_valid_file_never_panics(
        line in 0usize..24,
        value in proptest::prop_oneof![
            "\\PC{0,40}".prop_map(|v| format!("{v:?}")),
            proptest::num::i64::ANY.prop_map(|n| n.to_string()),
            "[\\PC{0,20}]",
            proptest::strategy::Just("\"\\u0000'; DROP ROLE x; --\"".to_string()),
            proptest::strategy::Just(format!("{:?}", "x".repeat(10_240))),
        ],
    ) {
        let text: String = SAMPLE
            .lines()
            .enumerate()
            .map(|(i, l)| match l.split_once(" = ") {
                Some((k, _)) if i == line => format!("{k} = {value}\n"),
                _ => format!("{l}\n"),
            })
            .collect();
        // A Config error (exit 64) that says more than its class: the
        // text after "config: " names what is wrong.
        if let Err(e) = Config::parse(&text, Path::new("/etc/credbroker")) {
            proptest::prop_assert!(
                matches!(&e, Error::Config(d) if !d.message().trim().is_empty()),
                "not a Config error with a message: {e:?}"
            );
        }
    }
}
