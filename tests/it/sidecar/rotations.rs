//! A reader playing the application through the sidecar's renewals and
//! rotations, and through a broker outage: every connection works.

use super::*;

/// Points 1, 2 (--exec), 4 and 5 of issue 5: 30 s of a reader connecting
/// every 100 ms through renewals and rotations, then SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sidecar_keeps_every_connection_working_through_rotations() {
    let role_name = "sc_rot";
    let (b, dir) = serving(&short_role(role_name)).await;
    let exec_log = dir.path().join("exec.log");
    let hook = format!("echo \"$CREDBROKER_USERNAME\" >> {}", exec_log.display());
    let mut sc = Sidecar::spawn(
        &b,
        dir.path(),
        role_name,
        &["--grace", "2s", "--exec", &hook],
    );
    wait_for_file(&mut sc).await;

    // Besides the application, a reader that only re-reads and parses the
    // file as fast as it can (1 ms apart), so "never a partial file" is
    // tested against every write, not sampled every 100 ms.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hammer = {
        let (names, path, stop) = (Names::of(&b), sc.out.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut reads, mut distinct, mut last) = (0u64, 0u64, String::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let text = std::fs::read_to_string(&path).unwrap();
                if let Err(e) = parse_file(&text, &names) {
                    panic!("partial or malformed file seen: {e}");
                }
                if text != last {
                    distinct += 1;
                    last = text;
                }
                reads += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            (reads, distinct)
        })
    };
    let report = Arc::new(Mutex::new(ReaderReport::default()));
    reader(
        Arc::new(Names::of(&b)),
        sc.out.clone(),
        Duration::from_secs(30),
        report.clone(),
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (fast_reads, fast_distinct) = hammer.join().expect("the fast reader failed");
    assert!(sc.running(), "sidecar died:\n{}", sc.log_text());

    let r = std::mem::take(&mut *report.lock().unwrap());
    assert!(r.failures.is_empty(), "reader failures: {:#?}", r.failures);
    assert_eq!(r.expired_failures + r.missing, 0, "{r:?}");
    assert!(r.connects_ok >= 100, "{} connections", r.connects_ok);
    assert!(r.changes >= 3, "the file changed only {} times", r.changes);
    assert!(fast_distinct >= 4, "{fast_distinct} versions seen");

    // Point 4: SIGTERM revokes every lease (current and draining) and
    // removes the file.
    sc.signal("TERM");
    assert_eq!(sc.wait(Duration::from_secs(30)).await, Some(0));
    assert!(!sc.out.exists(), "file left behind after SIGTERM");
    assert_eq!(
        b.broker_role_count().await,
        0,
        "roles left: {:?}",
        b.broker_roles().await
    );

    // Point 2: the hook ran once per new credential, in order.
    let hooked: Vec<String> = std::fs::read_to_string(&exec_log)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    assert_eq!(hooked, r.users, "--exec runs vs credentials seen");
    let log = sc.log_text();
    assert_eq!(log.matches("lease issued").count(), hooked.len(), "{log}");

    // Point 5: the password is nowhere in the sidecar's output.
    assert_no_password_in(&log, &r.passwords);
    println!(
        "reader: {} reads, {} connections, {} file changes, {} credentials; \
         fast reader: {fast_reads} whole reads of {fast_distinct} versions",
        r.reads,
        r.connects_ok,
        r.changes,
        r.users.len()
    );
    println!("timeline:\n{}", sc.timeline().join("\n"));
}

/// Points 2 (--signal) and 3: the broker is killed for 5 s mid-run; the
/// sidecar keeps the file while it is valid, survives, and recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sidecar_survives_a_broker_outage_and_signals_the_app() {
    let role_name = "sc_out";
    let (b, dir) = serving(&short_role(role_name)).await;

    // The "application": writes its pidfile once its trap is set, and
    // counts the signals it gets.
    let pidfile = dir.path().join("app.pid");
    let sigs = dir.path().join("signals");
    let script = format!(
        "trap 'echo usr1 >> {sigs}' USR1; echo $$ > {pid}.tmp; mv {pid}.tmp {pid}; \
         while :; do sleep 0.1; done",
        sigs = sigs.display(),
        pid = pidfile.display()
    );
    let mut app = Command::new("sh").arg("-c").arg(&script).spawn().unwrap();
    assert!(eventually(Duration::from_secs(10), || async { pidfile.exists() }).await);

    let template = dir.path().join("tpl");
    std::fs::write(&template, "{{dsn}}\nexpires={{expires_at}}\n").unwrap();
    let signal = format!("{}:USR1", pidfile.display());
    let format = format!("template:{}", template.display());
    let mut sc = Sidecar::spawn(
        &b,
        dir.path(),
        role_name,
        &["--grace", "2s", "--signal", &signal, "--format", &format],
    );
    wait_for_file(&mut sc).await;

    let report = Arc::new(Mutex::new(ReaderReport::default()));
    let reading = tokio::spawn(reader(
        Arc::new(Names::of(&b)),
        sc.out.clone(),
        Duration::from_secs(24),
        report.clone(),
    ));

    tokio::time::sleep(Duration::from_secs(7)).await;
    let mut broker = b;
    broker.kill_binary();
    let killed_at = tokio::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        sc.running(),
        "sidecar died in the outage:\n{}",
        sc.log_text()
    );
    broker.spawn_binary().await;
    let restarted_at = tokio::time::Instant::now();
    reading.await.unwrap();

    assert!(sc.running(), "sidecar died:\n{}", sc.log_text());
    let r = std::mem::take(&mut *report.lock().unwrap());
    assert!(r.failures.is_empty(), "reader failures: {:#?}", r.failures);
    let last_ok = r.last_ok.expect("no connection at all");
    assert!(
        last_ok > restarted_at + Duration::from_secs(2),
        "no working credential after the broker came back"
    );
    let log = sc.log_text();
    assert!(
        log.contains("broker call failed"),
        "the outage went unnoticed:\n{log}"
    );
    println!(
        "outage: broker down {:?}; reader: {} connections, {} failures on expired credentials, {} reads without a file",
        restarted_at - killed_at,
        r.connects_ok,
        r.expired_failures,
        r.missing
    );

    sc.signal("INT");
    assert_eq!(sc.wait(Duration::from_secs(30)).await, Some(0));
    assert!(!sc.out.exists());
    assert!(
        eventually(Duration::from_secs(10), || async {
            broker.broker_role_count().await == 0
        })
        .await,
        "roles left: {:?}",
        broker.broker_roles().await
    );

    // Point 2: one signal per new credential.
    let _ = app.kill();
    let _ = app.wait();
    let got = std::fs::read_to_string(&sigs)
        .unwrap_or_default()
        .lines()
        .count();
    // Counted after the sidecar exited: a rotation between the read above
    // and SIGINT writes (and signals) once more.
    let log = sc.log_text();
    let written = log.matches("credential written").count();
    assert!(got >= 2, "the app got {got} signals");
    assert_eq!(got, written, "signals vs credentials written");
    assert_no_password_in(&log, &r.passwords);
    println!("timeline:\n{}", sc.timeline().join("\n"));
}
