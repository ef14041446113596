//! `credbroker bench` with tiny counts: the command runs end to end on its
//! own throwaway PostgreSQL and writes a well-formed table. No timings are
//! checked here; figures belong in BENCHMARKS.md.

use std::path::Path;
use std::process::Command;

/// Runs `credbroker bench ARGS --out DIR` with `env` set and asserts it
/// succeeded; the output directory (deleted on drop) and stdout.
fn bench(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> (tempfile::TempDir, String) {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_credbroker"))
        .arg("bench")
        .args(args)
        .arg("--out")
        .arg(out.path())
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "bench {args:?} failed: {}\n{stdout}\n{stderr}",
        run.status
    );
    (out, stdout)
}

/// The report `name` a bench wrote in `out`, as text.
fn report(out: &Path, name: &str) -> String {
    std::fs::read_to_string(out.join(name)).unwrap()
}

/// The JSON report `name` a bench wrote in `out`.
fn report_json(out: &Path, name: &str) -> serde_json::Value {
    serde_json::from_str(&report(out, name)).unwrap()
}

/// The runs of a JSON report, each of `leases` leases without an error.
fn clean_runs(json: &serde_json::Value, leases: u64) -> &Vec<serde_json::Value> {
    let runs = json["runs"].as_array().unwrap();
    for r in runs {
        assert_eq!(r["leases"], leases, "{r}");
        assert_eq!(r["errors"], 0, "{r}");
    }
    runs
}

/// A timings row: `numbers` cells are positive numbers, `ratios` cells
/// are ratios (`…×`).
fn assert_timings(row: &[&str], numbers: std::ops::Range<usize>, ratios: std::ops::Range<usize>) {
    for cell in &row[numbers] {
        let v: f64 = cell
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {cell:?} in {row:?}"));
        assert!(v > 0.0, "row {row:?}");
    }
    for ratio in &row[ratios] {
        assert!(ratio.ends_with('×'), "row {row:?}");
    }
}

#[test]
fn bench_lease_writes_a_table_with_all_four_columns() {
    let (out, stdout) = bench(&["--callers", "1,2", "--leases", "20"], &[]);
    let md = report(out.path(), "lease.md");
    assert!(
        stdout.contains(md.trim()),
        "stdout is not the Markdown report"
    );
    let header = "| callers | figure | (a) plaintext | (b) verifier | (b′) its SQL | (c) credbroker | c/a | c/b | c/b′ |";
    assert!(md.contains(header), "no table header in:\n{md}");
    let rows = table_rows(&md, header);
    // Two caller counts × leases/s, p50, p99, max, then the costs.
    assert_eq!(rows.len(), 16, "{md}");
    let (timings, costs): (Vec<_>, Vec<_>) = rows
        .iter()
        .partition(|r| !r[1].contains('/') || r[1] == "leases/s");
    assert_eq!(timings.len(), 8, "{md}");
    for row in &costs {
        assert_eq!(row.len(), 9, "row {row:?}");
        // Only (c) has broker threads; every other cell is a count.
        for (i, cell) in row[2..6].iter().enumerate() {
            if row[1] == "CPU ms/lease, broker" && i < 3 {
                assert_eq!(*cell, "–", "row {row:?}");
                continue;
            }
            let v: f64 = cell
                .parse()
                .unwrap_or_else(|_| panic!("not a number: {cell:?} in {row:?}"));
            assert!(v >= 0.0, "row {row:?}");
        }
    }
    let pg_cpu: f64 = costs
        .iter()
        .filter(|r| r[1] == "CPU ms/lease, database")
        .flat_map(|r| r[2..6].iter().map(|c| c.parse::<f64>().unwrap()))
        .sum();
    assert!(pg_cpu > 0.0, "PostgreSQL's CPU is not counted: {md}");
    for row in &timings {
        assert_eq!(row.len(), 9, "row {row:?}");
        assert!(matches!(row[0], "1" | "2"), "row {row:?}");
        assert_timings(row, 2..6, 6..9);
    }
    assert!(md.contains("- errors: 0"), "{md}");

    let json = report_json(out.path(), "lease.json");
    let runs = clean_runs(&json, 20);
    assert_eq!(runs.len(), 8);
    // Where (c)'s time goes: the broker's steps, each once per issue or
    // revoke, summed from their tracing spans by the bench's layer.
    for r in runs.iter().filter(|r| r["scenario"] == "c_credbroker") {
        let steps = r["steps"].as_array().unwrap();
        let per_lease = |name: &str| {
            steps
                .iter()
                .find(|s| s["step"] == name)
                .and_then(|s| s["per_lease"].as_f64())
        };
        for name in [
            "store: write intent",
            "database: create user",
            "store: activate",
            "audit: append",
            "rest of the cycle (gRPC, TLS, handler, queueing)",
        ] {
            assert!(per_lease(name).is_some_and(|n| n >= 1.0), "{name}: {r}");
        }
    }
    assert!(md.contains("| store: write intent |"), "{md}");
    let scenarios: Vec<&str> = runs
        .iter()
        .map(|r| r["scenario"].as_str().unwrap())
        .collect();
    for s in [
        "a_plaintext",
        "b_verifier",
        "b2_backend_sql",
        "c_credbroker",
    ] {
        assert_eq!(scenarios.iter().filter(|x| **x == s).count(), 2, "{s}");
    }
}

/// The cells of the Markdown table under `header`, row by row.
fn table_rows<'a>(md: &'a str, header: &str) -> Vec<Vec<&'a str>> {
    md.lines()
        .skip_while(|l| *l != header)
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect()
}

#[test]
fn bench_issue_only_cleans_up_after_itself() {
    let (out, _) = bench(&["--issue-only", "--callers", "2", "--leases", "4"], &[]);
    let json = report_json(out.path(), "lease.json");
    assert_eq!(json["issue_only"], true);
    clean_runs(&json, 4);
}

#[test]
fn bench_mysql_runs_the_four_columns_on_mariadb_and_names_each_statement() {
    let (out, _) = bench(&["mysql", "--callers", "1", "--leases", "5"], &[]);
    let md = report(out.path(), "mysql.md");
    assert!(md.contains("MariaDB"), "{md}");
    assert!(md.contains("- errors: 0"), "{md}");
    let json = report_json(out.path(), "mysql.json");
    let runs = clean_runs(&json, 5);
    assert_eq!(runs.len(), 4, "{json}");
    // credbroker's own statements, one failsafe event per lease, in (b′)
    // and (c) alike; (a) and (b) go around the backend.
    for r in runs {
        let steps = r["steps"].as_array().cloned().unwrap_or_default();
        let event = steps
            .iter()
            .find(|s| s["step"] == "create failsafe event")
            .map(|s| s["per_lease"].as_f64().unwrap());
        match r["scenario"].as_str().unwrap() {
            "b2_backend_sql" | "c_credbroker" => assert_eq!(event, Some(1.0), "{r}"),
            _ => assert!(steps.is_empty(), "{r}"),
        }
    }
    assert!(md.contains("| create failsafe event |"), "{md}");
}

#[test]
fn bench_console_writes_a_row_per_page() {
    console_bench("sqlite", "SQLite");
}

#[test]
fn bench_console_on_a_postgres_store_writes_a_row_per_page() {
    console_bench("postgres", "PostgreSQL");
}

fn console_bench(store: &str, named: &str) {
    let (out, _) = bench(
        &[
            "console",
            "--store",
            store,
            "--leases",
            "300",
            "--requests",
            "2",
        ],
        &[],
    );
    let md = report(out.path(), "console.md");
    assert!(
        md.contains(&format!("over 300 live leases ({named} store)")),
        "{md}"
    );
    let header = md
        .lines()
        .find(|l| l.starts_with("| page |"))
        .unwrap_or_else(|| panic!("no table header in:\n{md}"));
    let rows = table_rows(&md, header);
    assert_eq!(rows.len(), 7, "{md}");
    for row in &rows {
        let p50: f64 = row[1].parse().unwrap_or_else(|_| panic!("{row:?}"));
        assert!(p50 > 0.0, "{row:?}");
    }
    let json = report_json(out.path(), "console.json");
    assert_eq!(json["pages"].as_array().unwrap().len(), 7);
    assert!(json["pages"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["requests"] == 2 && p["bytes"].as_u64().unwrap() > 0));
}

/// `bench outside`: `credbroker serve` driven from a separate
/// `bench-client` process, every column side by side — OpenBao included,
/// from the `bao` that scripts/ensure-vault-venv.sh installs.
#[test]
fn bench_outside_has_every_column_from_a_separate_process() {
    let venv_bin = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/vault-venv/bin");
    assert!(
        venv_bin.join("bao").is_file(),
        "OpenBao's bao is missing ({}): run scripts/ensure-vault-venv.sh (scripts/test.sh runs it)",
        venv_bin.join("bao").display()
    );
    let path = std::env::join_paths(std::iter::once(venv_bin.clone()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .unwrap();
    let (out, stdout) = bench(
        &["outside", "--callers", "1,2", "--leases", "4"],
        &[("PATH", path.as_os_str())],
    );
    let md = report(out.path(), "outside.md");
    assert!(stdout.contains(md.trim()), "stdout is not the report");
    assert!(md.contains("- errors: 0"), "{md}");
    assert!(
        md.contains("OpenBao: OpenBao v"),
        "OpenBao did not run: {md}"
    );
    let header = "| leases/s | (a) plaintext | (b′) same SQL | (c) gRPC | (c-v) Vault API | OpenBao | c/a | c/b′ | c-v/c | c/OpenBao |";
    assert!(md.contains(header), "no headline in:\n{md}");
    let rows = table_rows(&md, header);
    assert_eq!(rows.len(), 2, "{md}");
    for row in &rows {
        assert_eq!(row.len(), 10, "row {row:?}");
        assert_timings(row, 1..6, 6..10);
    }
    // Costs: the server's CPU where a server ran, a load average per run.
    for label in [
        "CPU ms/lease, server",
        "CPU ms/lease, client",
        "load (1 min) at start",
    ] {
        assert!(md.contains(&format!("| 1 | {label} |")), "{label}: {md}");
    }
    let json = report_json(out.path(), "outside.json");
    let runs = clean_runs(&json, 4);
    assert_eq!(runs.len(), 10, "{json}");
    for r in runs {
        assert!(r["cycle"]["p50_ms"].as_f64().unwrap() > 0.0, "{r}");
        let server = r["cost"]["server_cpu_ms"].as_f64();
        match r["column"].as_str().unwrap() {
            "a_plaintext" | "b2_same_sql" => assert_eq!(server, None, "{r}"),
            "c_grpc" | "cv_vault_api" | "openbao" => assert!(server.is_some(), "{r}"),
            other => panic!("unknown column {other}"),
        }
    }
}

/// `bench outside --mysql`: the same table on a throwaway MariaDB, four
/// columns from a separate `bench-client` process, `mariadbd`'s CPU.
#[test]
fn bench_outside_mysql_has_four_columns_from_a_separate_process() {
    let (out, stdout) = bench(
        &["outside", "--mysql", "--callers", "1,2", "--leases", "4"],
        &[],
    );
    let md = report(out.path(), "outside-mysql.md");
    assert!(stdout.contains(md.trim()), "stdout is not the report");
    assert!(
        md.contains("(MariaDB)") && md.contains("innodb_flush_log_at_trx_commit = 1"),
        "{md}"
    );
    assert!(md.contains("- errors: 0"), "{md}");
    let json = report_json(out.path(), "outside-mysql.json");
    let runs = clean_runs(&json, 4);
    assert_eq!(runs.len(), 8, "{json}");
    for r in runs {
        // Four leases can fall within one clock tick: a number, maybe 0.
        assert!(r["cost"]["database_cpu_ms"].as_f64().is_some(), "{r}");
        let server = r["cost"]["server_cpu_ms"].as_f64();
        match r["column"].as_str().unwrap() {
            "a_plaintext" | "b2_same_sql" => assert_eq!(server, None, "{r}"),
            "c_grpc" | "cv_vault_api" => assert!(server.is_some(), "{r}"),
            other => panic!("unexpected column {other}"),
        }
    }
}
