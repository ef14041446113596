// An application on node-postgres's Pool, as its docs advise: a Client
// class that re-reads the sidecar's file (--format json) each time the pool
// opens a connection, and a listener on the pool's 'error' event (an idle
// client whose session ends emits it; without a listener Node exits).
//
//     node pg_pool.js FILE checked|defaults CONFIG_JSON
//
// `checked` adds `maxLifetimeSeconds` below the lease's lifetime; node-pg
// has no test-on-borrow, so what keeps it safe is that a client whose
// session ended is removed from the pool when the end arrives. `defaults`
// keeps only the error listener. One JSON report line, the shape of
// pool_run.py's.
'use strict';
const fs = require('fs');
const pg = require('pg');

const [file, mode, configJson] = process.argv.slice(2);
const config = JSON.parse(configJson);
const readCredential = () => JSON.parse(fs.readFileSync(file, 'utf8'));

class FileClient extends pg.Client {
  constructor(options) {
    const c = readCredential();
    super({
      ...options,
      host: c.host,
      port: c.port,
      user: c.username,
      password: c.password,
      database: c.database,
      ssl: c.sslmode && c.sslmode !== 'disable' ? { rejectUnauthorized: c.sslmode === 'verify-full' } : false,
      connectionTimeoutMillis: 5000,
    });
  }
}

const options = { Client: FileClient, max: config.workers + 2 };
if (mode === 'checked') options.maxLifetimeSeconds = config.max_lifetime_s;
const pool = new pg.Pool(options);
let idleErrors = 0;
pool.on('error', () => { idleErrors += 1; });

const firstLine = (e) => String((e && e.message) || e).split('\n')[0].slice(0, 200);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const counts = { queries: 0, failed: 0 };
const errors = {};
let stop = false;

async function worker() {
  while (!stop) {
    try {
      const r = await pool.query('SELECT item FROM orders WHERE id = 1');
      if (r.rows[0].item !== 'coffee') throw new Error(`unexpected row ${r.rows[0].item}`);
      counts.queries += 1;
    } catch (e) {
      counts.queries += 1;
      counts.failed += 1;
      const k = firstLine(e);
      errors[k] = (errors[k] || 0) + 1;
    }
    await sleep(config.interval_ms);
  }
}

// The long query runs on a client checked out at the start (as a request
// handler holds one), so it is a session of the replaced credential that is
// busy when that lease is handed over.
const longReport = { started: false };
let held = null;
async function longQuery(oldUser) {
  Object.assign(longReport, { started: true, old_user: oldUser });
  const t0 = Date.now();
  try {
    const r = await held.query('SELECT current_user::text AS u, pg_sleep($1)::text', [config.long_s]);
    longReport.user = r.rows[0].u;
    longReport.ok = true;
  } catch (e) {
    longReport.ok = false;
    longReport.error = firstLine(e);
    const k = 'long query: ' + firstLine(e);
    errors[k] = (errors[k] || 0) + 1;
  }
  longReport.seconds = (Date.now() - t0) / 1000;
  held.release(); // back to the pool (and its 'error' listener) at once
  held = null;
}

async function main() {
  held = await pool.connect();
  // A checked-out client is not the pool's to watch: its session ending
  // would otherwise be an unhandled 'error' event.
  held.on('error', () => { idleErrors += 1; });
  const workers = Array.from({ length: config.workers }, worker);
  const started = Date.now();
  let current = readCredential();
  let handovers = 0;
  let lastChange = null;
  let long = null;
  for (;;) {
    await sleep(25);
    const now = Date.now();
    if (now - started > config.max_s * 1000) break;
    if (handovers >= config.handovers && now - lastChange >= config.tail_s * 1000) break;
    let seen;
    try { seen = readCredential(); } catch (e) { continue; }
    if (seen.lease_id !== current.lease_id) {
      handovers += 1;
      lastChange = now;
      if (long === null) long = longQuery(current.username);
      current = seen;
    }
  }
  stop = true;
  await Promise.all(workers);
  if (long) await long;
  if (held) held.release();
  await pool.end();
  console.log(JSON.stringify({
    queries: counts.queries,
    failed: counts.failed,
    handovers,
    errors,
    idle_errors: idleErrors,
    long_query: longReport,
    elapsed_s: (Date.now() - started) / 1000,
  }));
}

main().catch((e) => { console.error(e); process.exit(1); });
