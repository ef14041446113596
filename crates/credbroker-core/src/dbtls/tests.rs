//! The tests of `dbtls`: parameters, paths, warnings and a connector's
//! file errors, through the module's public functions.

use std::path::Path;

use super::*;

#[test]
fn libpq_parameters_are_taken_out_and_the_rest_kept_verbatim() {
    let (url, p) = split_url(
        "postgres://a@db:5432/x?options=-c%20x%3D1&sslmode=verify-full&sslrootcert=/etc/ca%20x.pem&application_name=y",
        Dialect::Postgres,
    )
    .unwrap();
    assert_eq!(
        url,
        "postgres://a@db:5432/x?options=-c%20x%3D1&application_name=y"
    );
    assert_eq!(p.mode, SslMode::VerifyFull);
    assert_eq!(p.rootcert, Some(RootCert::File("/etc/ca x.pem".into())));
    let (url, p) = split_url("postgres://a@db/x", Dialect::Postgres).unwrap();
    assert_eq!(
        (url.as_str(), p.mode),
        ("postgres://a@db/x", SslMode::Prefer)
    );
    let (url, p) = split_url("postgres://a@db/x?sslmode=require", Dialect::Postgres).unwrap();
    assert_eq!(
        (url.as_str(), p.mode),
        ("postgres://a@db/x", SslMode::Require)
    );
    assert_eq!(p.effective_mode(), SslMode::Require);
}

#[test]
fn mistakes_name_the_parameter() {
    for (url, want) in [
        ("postgres://h/x?sslmode=verify", "sslmode=\"verify\""),
        ("postgres://h/x?sslmode=verify-full", "needs sslrootcert"),
        ("postgres://h/x?sslmode=require&sslcert=/c.pem", "give both"),
        (
            "postgres://h/x?sslmode=disable&sslrootcert=/c.pem",
            "disables TLS",
        ),
        ("postgres://h/x?sslrootcert=", "empty value"),
    ] {
        let e = split_url(url, Dialect::Postgres).unwrap_err();
        assert!(e.contains(want), "{url}: {e}");
    }
    let e = split_url("mysql://h/x?ssl-mode=PREFERRED", Dialect::Mysql).unwrap_err();
    assert!(e.contains("REQUIRED"), "{e}");
    for q in [
        "ssl-mode=VERIFY_CA&ssl-ca=/ca.pem",
        "ssl-mode=REQUIRED&ssl-ca=/ca.pem",
    ] {
        let e = split_url(&format!("mysql://h/x?{q}"), Dialect::Mysql).unwrap_err();
        assert!(e.contains("VERIFY_IDENTITY"), "{q}: {e}");
    }
}

#[test]
fn mysql_names_map_to_the_same_modes() {
    let (url, p) = split_url(
        "mysql://root@h:3306/db?ssl-mode=VERIFY_IDENTITY&ssl-ca=/ca.pem&prefer_socket=false",
        Dialect::Mysql,
    )
    .unwrap();
    assert_eq!(url, "mysql://root@h:3306/db?prefer_socket=false");
    assert_eq!(p.mode, SslMode::VerifyFull);
    assert_eq!(p.describe(), "ssl-mode=VERIFY_IDENTITY, ssl-ca=/ca.pem");
    let (_, p) = split_url("mysql://h/db", Dialect::Mysql).unwrap();
    assert_eq!(p.mode, SslMode::Disable);
    assert_eq!(
        split_url("mysql://h/db?ssl_mode=required", Dialect::Mysql)
            .unwrap()
            .1
            .mode,
        SslMode::Require
    );
}

#[test]
fn libpq_promotions() {
    let p = |q: &str| {
        split_url(&format!("postgres://h/x?{q}"), Dialect::Postgres)
            .unwrap()
            .1
    };
    assert_eq!(
        p("sslmode=require&sslrootcert=/ca.pem").effective_mode(),
        SslMode::VerifyCa
    );
    assert_eq!(
        p("sslrootcert=system").effective_mode(),
        SslMode::VerifyFull
    );
    assert_eq!(
        p("sslmode=verify-ca&sslrootcert=/ca.pem").effective_mode(),
        SslMode::VerifyCa
    );
}

#[test]
fn relative_paths_become_absolute_against_the_config_directory() {
    let url = normalize_url(
        "postgres://h/x?sslmode=verify-full&sslrootcert=pki/ca.pem&options=-c%20a%3Db&sslcert=/abs/c.pem&sslkey=k%2Bey.pem",
        Dialect::Postgres,
        Path::new("/etc/credbroker"),
    )
    .unwrap();
    assert_eq!(
        url,
        "postgres://h/x?sslmode=verify-full&sslrootcert=/etc/credbroker/pki/ca.pem&options=-c%20a%3Db&sslcert=/abs/c.pem&sslkey=/etc/credbroker/k%2Bey.pem"
    );
    let (_, p) = split_url(&url, Dialect::Postgres).unwrap();
    assert_eq!(p.key, Some("/etc/credbroker/k+ey.pem".into()));
    assert_eq!(
        normalize_url("postgres://h/x", Dialect::Postgres, Path::new("/e")).unwrap(),
        "postgres://h/x"
    );
}

#[test]
fn only_remote_connections_without_verification_are_warned_about() {
    let p = |q: &str| {
        split_url(&format!("postgres://h/x?{q}"), Dialect::Postgres)
            .unwrap()
            .1
    };
    let hosts = |h: &[&str]| h.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let remote = hosts(&["db.internal"]);
    let w = weak_tls_warning("database \"d\"", &remote, &p("sslmode=disable")).unwrap();
    assert!(w.contains("TLS is OFF to db.internal"), "{w}");
    assert!(weak_tls_warning("d", &remote, &p(""))
        .unwrap()
        .contains("prefer"));
    assert!(weak_tls_warning("d", &remote, &p("sslmode=require"))
        .unwrap()
        .contains("checks no certificate"));
    assert!(weak_tls_warning("d", &remote, &p("sslmode=verify-full&sslrootcert=/c")).is_none());
    for local in ["127.0.0.1", "localhost", "[::1]", "/var/run/postgresql", ""] {
        assert!(
            weak_tls_warning("d", &hosts(&[local]), &p("sslmode=disable")).is_none(),
            "{local}"
        );
    }
}

#[test]
fn client_queries_follow_each_dialect() {
    assert_eq!(client_query(Dialect::Postgres, None, Some("/x")), "");
    assert_eq!(
        client_query(
            Dialect::Postgres,
            Some(SslMode::VerifyFull),
            Some("/etc/ssl/db ca.pem")
        ),
        "?sslmode=verify-full&sslrootcert=/etc/ssl/db%20ca.pem"
    );
    assert_eq!(
        client_query(Dialect::Mysql, Some(SslMode::VerifyCa), None),
        "?ssl-mode=VERIFY_CA"
    );
    assert!(url_warning(
        "d",
        "postgres://u@db.example/x?sslmode=disable",
        Dialect::Postgres
    )
    .is_some());
    assert!(url_warning(
        "d",
        "postgres://u@127.0.0.1/x?sslmode=disable",
        Dialect::Postgres
    )
    .is_none());
    assert!(url_warning("d", "mysql://u@10.1.2.3/x", Dialect::Mysql)
        .unwrap()
        .contains("OFF"));
}

#[test]
fn missing_files_are_errors_naming_the_parameter() {
    let (_, p) = split_url(
        "postgres://h/x?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        Dialect::Postgres,
    )
    .unwrap();
    let e = client_config(&p).unwrap_err();
    assert!(e.starts_with("sslrootcert /nonexistent/ca.pem"), "{e}");
}
