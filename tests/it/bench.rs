//! `credbroker bench` with tiny counts: the command runs end to end on its
//! own throwaway PostgreSQL and writes a well-formed table. No timings are
//! checked here; figures belong in BENCHMARKS.md.

use std::process::Command;

#[test]
fn bench_lease_writes_a_table_with_all_four_columns() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_credbroker"))
        .args(["bench", "--callers", "1,2", "--leases", "3", "--out"])
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "bench failed: {}\n{stdout}\n{stderr}",
        run.status
    );

    let md = std::fs::read_to_string(out.path().join("lease.md")).unwrap();
    assert!(
        stdout.contains(md.trim()),
        "stdout is not the Markdown report"
    );
    let header = "| callers | figure | (a) plaintext | (b) verifier | (b′) its SQL | (c) credbroker | c/a | c/b | c/b′ |";
    assert!(md.contains(header), "no table header in:\n{md}");
    let rows: Vec<Vec<&str>> = md
        .lines()
        .skip_while(|l| *l != header)
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.trim_matches('|').split('|').map(str::trim).collect())
        .collect();
    // Two caller counts × leases/s, p50, p99, max.
    assert_eq!(rows.len(), 8, "{md}");
    for row in &rows {
        assert_eq!(row.len(), 9, "row {row:?}");
        assert!(matches!(row[0], "1" | "2"), "row {row:?}");
        for cell in &row[2..6] {
            let v: f64 = cell
                .parse()
                .unwrap_or_else(|_| panic!("not a number: {cell:?} in {row:?}"));
            assert!(v > 0.0, "row {row:?}");
        }
        for ratio in &row[6..9] {
            assert!(ratio.ends_with('×'), "row {row:?}");
        }
    }
    assert!(md.contains("- errors: 0"), "{md}");

    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("lease.json")).unwrap())
            .unwrap();
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 8);
    for r in runs {
        assert_eq!(r["leases"], 3, "{r}");
        assert_eq!(r["errors"], 0, "{r}");
    }
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

#[test]
fn bench_issue_only_cleans_up_after_itself() {
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_credbroker"))
        .args([
            "bench",
            "--issue-only",
            "--callers",
            "2",
            "--leases",
            "4",
            "--out",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "bench failed: {}\n{}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("lease.json")).unwrap())
            .unwrap();
    assert_eq!(json["issue_only"], true);
    for r in json["runs"].as_array().unwrap() {
        assert_eq!(r["leases"], 4, "{r}");
        assert_eq!(r["errors"], 0, "{r}");
    }
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
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_credbroker"))
        .args([
            "bench",
            "console",
            "--store",
            store,
            "--leases",
            "300",
            "--requests",
            "2",
            "--out",
        ])
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        run.status.success(),
        "bench console failed: {}\n{stdout}\n{stderr}",
        run.status
    );
    let md = std::fs::read_to_string(out.path().join("console.md")).unwrap();
    assert!(
        md.contains(&format!("over 300 live leases ({named} store)")),
        "{md}"
    );
    let rows: Vec<&str> = md
        .lines()
        .skip_while(|l| !l.starts_with("| page |"))
        .skip(2)
        .take_while(|l| l.starts_with('|'))
        .collect();
    assert_eq!(rows.len(), 7, "{md}");
    for row in rows {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let p50: f64 = cells[1].parse().unwrap_or_else(|_| panic!("{row}"));
        assert!(p50 > 0.0, "{row}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("console.json")).unwrap())
            .unwrap();
    assert_eq!(json["pages"].as_array().unwrap().len(), 7);
    assert!(json["pages"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["requests"] == 2 && p["bytes"].as_u64().unwrap() > 0));
}
