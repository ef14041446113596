use super::*;
use tokio_postgres::config::{Host, TargetSessionAttrs};

fn tcp(c: &PgConnStr) -> Vec<(String, u16)> {
    c.hosts.iter().map(|h| (h.host.clone(), h.port)).collect()
}

fn hp(list: &[(&str, u16)]) -> Vec<(String, u16)> {
    list.iter().map(|(h, p)| (h.to_string(), *p)).collect()
}

#[test]
fn a_multi_host_url_follows_the_primary() {
    let c = parse(
        "postgres://broker@db1.internal:5432,db2.internal:5433/credbroker?target_session_attrs=read-write",
    )
    .unwrap();
    assert_eq!(
        tcp(&c),
        hp(&[("db1.internal", 5432), ("db2.internal", 5433)])
    );
    assert_eq!(c.user.as_deref(), Some("broker"));
    assert_eq!(c.dbname.as_deref(), Some("credbroker"));
    assert_eq!(
        c.config.get_target_session_attrs(),
        TargetSessionAttrs::ReadWrite
    );
    assert_eq!(
        c.config.get_hosts(),
        &[
            Host::Tcp("db1.internal".into()),
            Host::Tcp("db2.internal".into())
        ]
    );
    assert_eq!(c.config.get_ports(), &[5432, 5433]);
    assert_eq!(c.hosts_label(), "db1.internal:5432, db2.internal:5433");
}

#[test]
fn a_url_with_one_host_ipv6_a_socket_and_defaults() {
    let c = parse("postgresql://u@[::1]:6432,db2/x").unwrap();
    assert_eq!(tcp(&c), hp(&[("::1", 6432), ("db2", 5432)]));
    assert_eq!(c.hosts[0].to_string(), "[::1]:6432");
    let c = parse("postgres://u@%2Fvar%2Frun%2Fpostgresql/x").unwrap();
    assert_eq!(c.hosts[0].host, "/var/run/postgresql");
    assert!(matches!(c.config.get_hosts()[0], Host::Unix(_)));
    // An '@' in a parameter value is not the end of a user name.
    let c = parse("postgres://u@db/x?application_name=a@b").unwrap();
    assert_eq!(c.config.get_application_name(), Some("a@b"));
    assert_eq!(c.user.as_deref(), Some("u"));
}

#[test]
fn key_value_words_with_several_hosts_and_ports() {
    let c = parse(
        "host=db1,db2 port=5432,5433 dbname='cred broker' user=broker target_session_attrs=read-write \
         sslmode=verify-full sslrootcert=/etc/ca.pem application_name='it\\'s'",
    )
    .unwrap();
    assert_eq!(tcp(&c), hp(&[("db1", 5432), ("db2", 5433)]));
    assert_eq!(c.config.get_dbname(), Some("cred broker"));
    assert_eq!(c.config.get_application_name(), Some("it's"));
    assert_eq!(c.tls.mode, dbtls::SslMode::VerifyFull);
    assert_eq!(
        c.config.get_target_session_attrs(),
        TargetSessionAttrs::ReadWrite
    );
    // One port for every host.
    let c = parse("host=db1,db2 port=6000 dbname=x").unwrap();
    assert_eq!(tcp(&c), hp(&[("db1", 6000), ("db2", 6000)]));
    let c = parse("hostaddr=10.0.0.1,10.0.0.2 dbname=x").unwrap();
    assert_eq!(tcp(&c), hp(&[("10.0.0.1", 5432), ("10.0.0.2", 5432)]));
}

/// Every mistake names the key and the part that is wrong.
#[test]
fn mistakes_name_the_key_and_the_part() {
    for (s, want) in [
        // URL form.
        (
            "postgres://u@db1:5432,db2:54x2/x",
            "the 2nd of 2 hosts, \"db2:54x2\",: port \"54x2\" is not a port number",
        ),
        ("postgres://u@db1:0/x", "port \"0\" is not a port number"),
        (
            "postgres://u@db1,,db3/x",
            "the 2nd of 3 hosts, \"\", names no host",
        ),
        (
            "postgres://u@db1,:5433/x",
            "the 2nd of 2 hosts, \":5433\", names no host",
        ),
        ("postgres://u@[::1/x", "lacks the ']'"),
        (
            "postgres://u@[::1]5432/x",
            "expected \":PORT\" after the ']'",
        ),
        ("postgres://u@::1:5432/x", "IPv6 address goes in brackets"),
        (
            "postgres://u@db/x?sslmode",
            "parameter \"sslmode\": expected key=value",
        ),
        (
            "postgres://u@db/x?target_session_attrs=readwrite",
            "target_session_attrs=\"readwrite\": expected any, read-write or read-only",
        ),
        (
            "postgres://u@db/x?target_session_attrs=primary",
            "read-write finds the primary",
        ),
        (
            "postgres://u@db/x?conect_timeout=3",
            "\"conect_timeout\": not a libpq connection parameter",
        ),
        (
            "postgres://u@db/x?connect_timeout=3s",
            "connect_timeout=\"3s\": expected a whole number of seconds",
        ),
        (
            "postgres://u@db/x?service=prod",
            "\"service\": a libpq parameter this broker's PostgreSQL driver does not support",
        ),
        (
            "postgres://u@db/x?sslmode=verify-full",
            "sslmode=verify-full needs sslrootcert",
        ),
        ("postgres:///x", "no host"),
        // key=value form.
        (
            "host=db1,db2 port=5432,5433,5434",
            "port: 3 ports for 2 hosts",
        ),
        (
            "host=db1,,db3",
            "host: an empty entry (the 2nd of 3) is not a host name",
        ),
        (
            "host=db1 port=5432,x",
            "port: \"x\" (the 2nd of 2) is not a port number",
        ),
        (
            "host=db1 port=99999",
            "port: \"99999\" is not a port number",
        ),
        (
            "hostaddr=10.0.0.1,db2",
            "hostaddr: \"db2\" (the 2nd of 2) is not an IP address",
        ),
        (
            "host=a,b hostaddr=10.0.0.1",
            "hostaddr: 1 addresses for 2 hosts",
        ),
        ("host=db1 dbname", "\"dbname\": expected key=value"),
        (
            "host=db1 dbname='x",
            "dbname: the quoted value has no closing '",
        ),
        ("host=db1 =x", "no key before it"),
        (
            "host=db1 keepalives=yes",
            "keepalives=\"yes\": expected 0 or 1",
        ),
        (
            "host=db1 sslmode=verify-ca",
            "sslmode=verify-ca needs sslrootcert",
        ),
        ("host=db1 sslmode=maybe", "sslmode=\"maybe\""),
        (
            "host=db1 channel_binding=always",
            "channel_binding=\"always\"",
        ),
        ("dbname=x", "no host"),
        ("", "empty"),
        ("mysql://u@db/x", "scheme \"mysql\""),
    ] {
        match parse(s) {
            Ok(_) => panic!("{s:?} was accepted"),
            Err(e) => assert!(e.to_string().contains(want), "{s:?}: {e}"),
        }
    }
}

#[test]
fn a_password_in_either_form_is_refused_without_quoting_it() {
    for s in [
        "postgres://u:s3cret@db/x",
        "host=db password=s3cret",
        "postgres://u@db/x?password=s3cret",
    ] {
        let e = parse(s).unwrap_err();
        assert_eq!(e, ConnStrError::Password, "{s}");
        assert!(!e.to_string().contains("s3cret"));
    }
}

#[test]
fn relative_tls_paths_become_absolute_in_both_forms() {
    let base = Path::new("/etc/credbroker");
    assert_eq!(
        normalize(
            "postgres://u@a:1,b:2/x?sslmode=verify-full&sslrootcert=pki/ca.pem",
            base
        )
        .unwrap(),
        "postgres://u@a:1,b:2/x?sslmode=verify-full&sslrootcert=/etc/credbroker/pki/ca.pem"
    );
    let kv = normalize(
        "host=a,b sslmode=verify-full sslrootcert=pki/ca.pem dbname=x",
        base,
    )
    .unwrap();
    assert_eq!(
        kv,
        "host='a,b' sslmode='verify-full' sslrootcert='/etc/credbroker/pki/ca.pem' dbname='x'"
    );
    let c = parse(&kv).unwrap();
    assert_eq!(
        c.tls.rootcert,
        Some(dbtls::RootCert::File("/etc/credbroker/pki/ca.pem".into()))
    );
}

#[test]
fn warnings_cover_every_remote_host() {
    let w = tls_warning(
        "the lease store",
        "host=127.0.0.1,db2.internal sslmode=require",
    )
    .unwrap();
    assert!(
        w.contains("db2.internal") && !w.contains("127.0.0.1"),
        "{w}"
    );
    assert!(tls_warning("s", "postgres://u@127.0.0.1,localhost/x?sslmode=disable").is_none());
}

#[test]
fn a_mysql_url_with_two_hosts_is_told_it_takes_one() {
    let e = mysql_host_count_error("mysql://root@db1:3306,db2:3306/x").unwrap();
    assert!(e.contains("takes one"), "{e}");
    assert!(mysql_host_count_error("mysql://root@db1:3306/x?a=b,c").is_none());
}
