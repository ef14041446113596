"""The run every Python pool client shares: worker threads query through the
pool every `interval_ms` while a watcher counts handovers (the sidecar's
file naming a new lease). One connection is checked out of the pool at the
start (as a request handler holds one); right after the first handover the
long query runs on it, so a session of the replaced credential is busy when
that lease is handed over `--grace` later. Ends `tail_s` after the last
handover it waits for. The report is one JSON line (the same shape as
pg_pool.js's and HikariPool.java's).
"""

import collections
import json
import threading
import time


def read_credential(path):
    with open(path) as f:
        return json.load(f)


def first_line(e):
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:200]


def run(path, config, query, long_query):
    lock = threading.Lock()
    counts = {"queries": 0, "failed": 0}
    errors = collections.Counter()
    stop = threading.Event()
    long_report = {"started": False}

    def worker():
        while not stop.is_set():
            try:
                query()
                with lock:
                    counts["queries"] += 1
            except Exception as e:  # every failure the application would see
                with lock:
                    counts["queries"] += 1
                    counts["failed"] += 1
                    errors[first_line(e)] += 1
            time.sleep(config["interval_ms"] / 1000)

    held = long_query()  # a generator: checks a connection out now
    next(held)

    def long_runner(old_user):
        long_report.update(started=True, old_user=old_user)
        t0 = time.monotonic()
        try:
            long_report["user"] = held.send(config["long_s"])
            long_report["ok"] = True
        except Exception as e:
            long_report["ok"] = False
            long_report["error"] = first_line(e)
            with lock:
                errors["long query: " + first_line(e)] += 1
        long_report["seconds"] = round(time.monotonic() - t0, 3)

    threads = [threading.Thread(target=worker) for _ in range(config["workers"])]
    for t in threads:
        t.start()
    started = time.monotonic()
    current = read_credential(path)
    handovers, last_change, long_thread = 0, None, None
    while True:
        time.sleep(0.025)
        now = time.monotonic()
        if now - started > config["max_s"]:
            break
        if handovers >= config["handovers"] and now - last_change >= config["tail_s"]:
            break
        try:
            seen = read_credential(path)
        except (OSError, ValueError):
            continue  # the sidecar replaces the file atomically; a gap is not ours to judge
        if seen["lease_id"] != current["lease_id"]:
            handovers += 1
            last_change = now
            if long_thread is None:
                long_thread = threading.Thread(target=long_runner, args=(current["username"],))
                long_thread.start()
            current = seen
    stop.set()
    for t in threads:
        t.join()
    if long_thread is not None:
        long_thread.join()
    held.close()  # returns the connection if the long query never ran
    return {
        "queries": counts["queries"],
        "failed": counts["failed"],
        "handovers": handovers,
        "errors": dict(errors),
        "long_query": long_report,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
