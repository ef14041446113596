//! The alert rules and dashboard we ship (deploy/prometheus/): checked and
//! unit-tested by promtool, every series they name exported by a real
//! broker, and one alert taken the whole way — a real broker scraped by a
//! real Prometheus (Debian's `prometheus`), its alert routed by a real
//! Alertmanager (`prometheus-alertmanager`) to a webhook in this test.
//! The tools come from `scripts/ensure-prometheus.sh`; missing, the tests
//! fail saying so.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use credbroker_testkit::throwaway::{PostgresOptions, ThrowawayPostgres};

use crate::support::*;

const RULES: &str = "deploy/prometheus/credbroker-alerts.yml";
const RULE_TESTS: &str = "deploy/prometheus/tests/credbroker-alerts.test.yml";
const DASHBOARD: &str = "deploy/prometheus/credbroker-dashboard.json";

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `name` on the PATH, or a failure that says how to get it.
fn tool(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not on the PATH: run scripts/ensure-prometheus.sh \
                 (apt-get install -y prometheus prometheus-alertmanager)"
            )
        })
}

/// Runs promtool in `dir`: whether it succeeded, and all it said.
fn promtool(args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new(tool("promtool"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool runs");
    let said =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), said)
}

#[test]
fn promtool_checks_the_shipped_rules_and_their_unit_tests_pass() {
    let tests = repo(RULE_TESTS);
    let test_file = tests.file_name().unwrap().to_str().unwrap();
    for (args, dir) in [
        (["check", "rules", RULES], repo("")),
        (
            ["test", "rules", test_file],
            tests.parent().unwrap().to_path_buf(),
        ),
    ] {
        let (ok, said) = promtool(&args, &dir);
        assert!(ok, "promtool {}:\n{said}", args.join(" "));
        println!("{said}");
    }

    // The same checks refuse what is wrong: a rule that does not parse, and
    // a unit test whose expectation the rules do not meet.
    let dir = tempfile::tempdir().unwrap();
    let shipped = std::fs::read_to_string(repo(RULES)).unwrap();
    std::fs::write(
        dir.path().join("broken.yml"),
        shipped.replace("credbroker_store_up) == 0", "credbroker_store_up) == = 0"),
    )
    .unwrap();
    let (ok, _) = promtool(&["check", "rules", "broken.yml"], dir.path());
    assert!(!ok, "promtool accepted a broken expression");
    std::fs::write(dir.path().join("credbroker-alerts.yml"), &shipped).unwrap();
    let unit = std::fs::read_to_string(&tests)
        .unwrap()
        .replace("../credbroker-alerts.yml", "credbroker-alerts.yml")
        .replace(
            "summary: \"The lease store does not answer (b1:9464)\"",
            "summary: \"something else\"",
        );
    std::fs::write(dir.path().join("wrong.test.yml"), unit).unwrap();
    let (ok, _) = promtool(&["test", "rules", "wrong.test.yml"], dir.path());
    assert!(!ok, "promtool passed a wrong expectation");
}

/// The `credbroker_*` names in `text` (metric names are lowercase; alert
/// names are CamelCase and never match).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("credbroker_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

/// Every query string of a Grafana dashboard: targets' `expr` and the
/// template variables' `query`/`definition` (not a data-source variable's,
/// whose `query` is the kind of data source).
fn dashboard_queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m)
            if m.get("type").and_then(|t| t.as_str()) == Some("datasource") => {}
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => dashboard_queries(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| dashboard_queries(v, out)),
        _ => {}
    }
}

/// The sample names in a scrape (labels and values cut off).
fn scraped(scrape: &str) -> BTreeSet<String> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn the_dashboard_and_the_rules_name_only_series_a_running_broker_exports() {
    let mut b = TestBroker::prepare(&role("ro", "{db}", "5m", "10m", APP)).await;
    let mport = b.listen_metrics();
    b.spawn_binary().await;
    wait_port(mport).await;
    // What the registry exports: every family, with or without series (a
    // family without one prints nothing, so a scrape alone is not enough).
    let metrics = credbroker::metrics::Metrics::new();
    metrics.count_audit_failures(Default::default());
    let exported = metrics.sample_names();
    assert!(
        exported.contains("credbroker_leases_issued_total") && exported.len() > 25,
        "the registry's sample names: {exported:?}"
    );
    // … and it is the whole truth: a running broker exports nothing else.
    let scrape = http_get(mport, "/metrics").await;
    let live = scraped(&scrape);
    assert!(live.contains("credbroker_store_up"), "{scrape}");
    let unlisted: Vec<_> = live.difference(&exported).collect();
    assert!(
        unlisted.is_empty(),
        "scraped but not in the registry's names: {unlisted:?}"
    );

    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo(DASHBOARD)).unwrap())
            .expect("the dashboard is JSON");
    let mut queries = Vec::new();
    dashboard_queries(&dashboard, &mut queries);
    let panels = dashboard["panels"].as_array().expect("panels").len();
    assert!(panels >= 10, "{panels} panels");
    let mut named = BTreeSet::new();
    for q in &queries {
        let names = metric_names(q);
        assert!(
            !names.is_empty(),
            "dashboard query names no credbroker metric: {q}"
        );
        for n in names {
            assert!(
                exported.contains(&n),
                "dashboard query names {n}, which the broker does not export: {q}"
            );
            named.insert(n);
        }
    }

    let rules = std::fs::read_to_string(repo(RULES)).unwrap();
    let exprs: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("expr:"))
        .collect();
    assert!(exprs.len() >= 13, "{} rules", exprs.len());
    for e in &exprs {
        let names = metric_names(e);
        assert!(!names.is_empty(), "rule names no credbroker metric: {e}");
        for n in names {
            assert!(
                exported.contains(&n),
                "rule names {n}, which the broker does not export: {e}"
            );
        }
    }
    println!(
        "{} dashboard queries in {panels} panels and {} rules; {} of the {} exported sample names named by the dashboard; {} of them in a fresh broker's scrape",
        queries.len(),
        exprs.len(),
        named.len(),
        exported.len(),
        live.len()
    );
    b.kill_binary();
}

/// A child process killed (and waited for) when the test ends, however it
/// ends; its output goes to `log`.
struct Running {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Running {
    fn spawn(name: &'static str, program: PathBuf, args: &[String], log: PathBuf) -> Running {
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Running { name, child, log }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- {} log (last lines) ---\n{}",
            self.name,
            lines[lines.len().saturating_sub(15)..].join("\n")
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shipped rules with `alert`'s `for:` replaced by `to`; returns the
/// text and the `for:` it shipped with.
fn with_for(rules: &str, alert: &str, to: &str) -> (String, String) {
    let mut out = Vec::new();
    let mut inside = false;
    let mut shipped = None;
    for line in rules.lines() {
        let t = line.trim_start();
        if let Some(name) = t.strip_prefix("- alert:") {
            inside = name.trim() == alert;
        }
        match t.strip_prefix("for:") {
            Some(v) if inside && shipped.is_none() => {
                shipped = Some(v.trim().to_string());
                out.push(line.replace(t, &format!("for: {to}")));
            }
            _ => out.push(line.to_string()),
        }
    }
    let shipped = shipped.unwrap_or_else(|| panic!("{alert} has no for: in the rules"));
    (out.join("\n") + "\n", shipped)
}

/// A webhook receiver: every POST's body, with when it arrived.
async fn webhook() -> (u16, tokio::sync::mpsc::UnboundedReceiver<(Instant, String)>) {
    use axum::extract::State;
    use axum::routing::post;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new()
        .route(
            "/hook",
            post(
                |State(tx): State<tokio::sync::mpsc::UnboundedSender<(Instant, String)>>,
                 body: String| async move {
                    let _ = tx.send((Instant::now(), body));
                    "ok"
                },
            ),
        )
        .with_state(tx);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(l, app).await });
    (port, rx)
}

/// A GET that may fail (a server still starting answers 503): the body
/// of a 200, else None.
async fn try_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| body.to_string())
}

/// The value of the broker's own sample `series` (exact labels), 0 if absent.
async fn broker_sample(mport: u16, series: &str) -> f64 {
    http_get(mport, "/metrics")
        .await
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

const ALERT: &str = "CredbrokerRevocationsFailing";
const GROUP_WAIT: Duration = Duration::from_secs(1);

/// A Prometheus duration of whole seconds or minutes (`10s`, `2m`).
fn prometheus_duration(d: &str) -> Duration {
    let (n, unit) = d.split_at(d.len() - 1);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("duration {d:?}"));
    match unit {
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(60 * n),
        _ => panic!("duration {d:?}: only s and m are read here"),
    }
}

#[tokio::test]
async fn revocations_failing_pages_through_prometheus_and_alertmanager_to_a_webhook() {
    // The shipped for: (minutes) shortened to 10 s; 1 s scrape and evaluation.
    page_when_revocations_fail(Some(Duration::from_secs(10)), Duration::from_secs(1)).await;
}

/// The same page with the rules exactly as shipped (`for: 2m`) and a 5 s
/// scrape and evaluation: about three minutes.
#[tokio::test]
#[ignore = "long"]
async fn revocations_failing_pages_with_the_shipped_rules_unchanged() {
    page_when_revocations_fail(None, Duration::from_secs(5)).await;
}

/// Stops a database under three live leases and measures how long after
/// the broker first exposes a failing lease the alert reaches a webhook.
/// `for_`: the alert's `for:` in the test (None: as shipped); `interval`:
/// Prometheus' scrape and evaluation interval.
async fn page_when_revocations_fail(for_: Option<Duration>, interval: Duration) {
    let (scrape, evaluation) = (interval, interval);
    let prometheus = tool("prometheus");
    let alertmanager = tool("prometheus-alertmanager");
    assert!(
        credbroker_testkit::throwaway::postgres_binaries_present(),
        "PostgreSQL server binaries are missing: install them with `apt-get install -y postgresql`"
    );
    // A cluster of the test's own: it is stopped while it holds leases.
    let mut pg = ThrowawayPostgres::start(PostgresOptions::default())
        .await
        .expect("throwaway PostgreSQL for the alert test");
    let mut b = TestBroker::prepare_on(&pg, &demo_role("short", "2s", "1m")).await;
    let mport = b.listen_metrics();
    b.spawn_binary().await;
    wait_port(mport).await;

    let dir = tempfile::tempdir().unwrap();
    let (hook_port, mut hooks) = webhook().await;
    let shipped = std::fs::read_to_string(repo(RULES)).unwrap();
    let (rules, shipped_for) = match for_ {
        Some(d) => with_for(&shipped, ALERT, &format!("{}s", d.as_secs())),
        None => {
            let (_, f) = with_for(&shipped, ALERT, "0s");
            (shipped.clone(), f)
        }
    };
    let for_ = for_.unwrap_or_else(|| prometheus_duration(&shipped_for));
    std::fs::write(dir.path().join("rules.yml"), rules).unwrap();
    let (am_port, prom_port) = (free_port(), free_port());
    std::fs::write(
        dir.path().join("alertmanager.yml"),
        format!(
            "route:\n  receiver: hook\n  group_by: [alertname, database]\n  group_wait: {}s\n  \
             group_interval: 5s\n  repeat_interval: 1h\nreceivers:\n  - name: hook\n    \
             webhook_configs:\n      - url: http://127.0.0.1:{hook_port}/hook\n",
            GROUP_WAIT.as_secs()
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: {}s\n  evaluation_interval: {}s\nrule_files: [rules.yml]\n\
             alerting:\n  alertmanagers:\n    - static_configs:\n        - targets: ['127.0.0.1:{am_port}']\n\
             scrape_configs:\n  - job_name: credbroker\n    static_configs:\n      - targets: ['127.0.0.1:{mport}']\n",
            scrape.as_secs(),
            evaluation.as_secs()
        ),
    )
    .unwrap();
    let p = |f: &str| dir.path().join(f).display().to_string();
    let am = Running::spawn(
        "alertmanager",
        alertmanager,
        &[
            format!("--config.file={}", p("alertmanager.yml")),
            format!("--storage.path={}", p("am-data")),
            format!("--web.listen-address=127.0.0.1:{am_port}"),
            // No cluster: it would listen on :9094 for peers.
            "--cluster.listen-address=".into(),
        ],
        dir.path().join("alertmanager.log"),
    );
    let prom = Running::spawn(
        "prometheus",
        prometheus,
        &[
            format!("--config.file={}", p("prometheus.yml")),
            format!("--storage.tsdb.path={}", p("prom-data")),
            format!("--web.listen-address=127.0.0.1:{prom_port}"),
        ],
        dir.path().join("prometheus.log"),
    );
    let logs = || format!("{}\n{}", prom.log_tail(), am.log_tail());

    // Prometheus scrapes the broker, and the rules are loaded.
    let scraping = eventually(Duration::from_secs(30), || async {
        try_get(prom_port, "/api/v1/query?query=credbroker_database_up")
            .await
            .is_some_and(|body| body.contains("\"main\""))
    })
    .await;
    assert!(
        scraping,
        "Prometheus does not scrape the broker\n{}",
        logs()
    );
    let loaded = http_get(prom_port, "/api/v1/rules").await;
    assert!(
        loaded.contains(ALERT),
        "rules not loaded: {loaded}\n{}",
        logs()
    );

    // Three live leases, then the database goes away before they expire.
    let mut leases = Vec::new();
    for _ in 0..3 {
        leases.push(issue(&b, "app", "short", 3).await.expect("issue"));
    }
    let up = "credbroker_database_up{database=\"main\"}";
    assert_eq!(
        broker_sample(mport, up).await,
        1.0,
        "the database answers its ping"
    );
    pg.stop().await.unwrap();
    let stopped = Instant::now();
    let expiry = leases.iter().map(|l| ts(&l.expires_at)).max().unwrap();
    println!("database stopped with 3 live leases; they expire at {expiry}");

    // The moment the broker's own /metrics first shows a failing lease:
    // where the alert's condition becomes true for any scraper.
    let failing_series =
        "credbroker_leases_live{role=\"short\",database=\"main\",state=\"failing\"}";
    let mut visible = None;
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        if broker_sample(mport, failing_series).await > 0.0 {
            visible = Some(Instant::now());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let visible = visible.unwrap_or_else(|| {
        panic!(
            "no failing lease within 90 s of the database stopping\n{}",
            b.broker_log()
        )
    });
    println!(
        "the broker showed failing leases {:.1} s after the database stopped",
        visible.duration_since(stopped).as_secs_f64()
    );

    assert!(
        eventually(Duration::from_secs(15), || async {
            broker_sample(mport, up).await == 0.0
        })
        .await,
        "credbroker_database_up stays 1 for a stopped database"
    );

    // Then the alert, through Prometheus and Alertmanager.
    let budget = for_ + scrape + evaluation + GROUP_WAIT;
    let page = tokio::time::timeout(budget + Duration::from_secs(120), async {
        loop {
            let (at, body) = hooks.recv().await.expect("webhook open");
            let v: serde_json::Value = serde_json::from_str(&body).expect("webhook JSON");
            let ours = v["alerts"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|a| a["labels"]["alertname"] == ALERT && a["status"] == "firing");
            if let Some(a) = ours {
                return (at, a.clone());
            }
        }
    })
    .await;
    let (paged, alert) = page.unwrap_or_else(|_| {
        panic!(
            "{ALERT} did not reach the webhook within {budget:?} + 120 s\n{}",
            logs()
        )
    });
    let took = paged.duration_since(visible);
    println!(
        "{ALERT} reached the webhook {:.1} s after the broker first showed a failing lease \
         ({:.1} s after the database stopped); budget: for {}s (shipped: {shipped_for}) + scrape {}s \
         + evaluation {}s + group_wait {}s = {}s",
        took.as_secs_f64(),
        paged.duration_since(stopped).as_secs_f64(),
        for_.as_secs(),
        scrape.as_secs(),
        evaluation.as_secs(),
        GROUP_WAIT.as_secs(),
        budget.as_secs()
    );
    assert_eq!(alert["labels"]["database"], "main", "{alert}");
    assert_eq!(alert["labels"]["severity"], "critical", "{alert}");
    assert_eq!(alert["labels"]["job"], "credbroker", "{alert}");
    let summary = alert["annotations"]["summary"].as_str().unwrap_or_default();
    assert!(
        summary.contains("cannot be revoked") && summary.contains("main"),
        "{alert}"
    );
    assert_eq!(
        alert["annotations"]["runbook_url"],
        "docs/ALERTS.md#credbrokerrevocationsfailing"
    );
    // `for:` is honoured: no page before the condition held that long
    // (less one scrape: Prometheus may have seen it before this poll did).
    assert!(
        took + scrape + Duration::from_millis(200) >= for_,
        "paged after {took:?}, before for: {for_:?}"
    );
    // And it arrives within the pipeline's own delays; the slack is for a
    // loaded machine (two cores shared), not for the pipeline.
    assert!(
        took <= budget + Duration::from_secs(15),
        "paged after {took:?}; budget {budget:?}\n{}",
        logs()
    );
    drop(prom);
    drop(am);
    b.kill_binary();
}
