// The web console as a person uses it, in Debian's headless Chromium
// driven by playwright-core. Started by tests/it/console.rs, which issues
// the leases, opens real database sessions as the leased users, and checks
// afterwards that what the page revoked is gone. This script only drives
// the browser and checks what the pages show; it exits non-zero with the
// first thing that did not hold.
//
// Client certificates: playwright-core's `clientCertificates` context
// option. Playwright terminates TLS towards the broker in its own Node-side
// proxy (OpenSSL), which presents the certificate — the admin's as the
// PKCS#12 file `pki dev` writes (pfxPath), the other identity's as PEM —
// and verifies the broker's server certificate against the dev CA
// (NODE_EXTRA_CA_CERTS, set by the Rust test). Chromium itself speaks to
// that proxy. Everything else (pages, forms, the CSP, the confirm dialog,
// redirects) is Chromium's.
//
// Environment: CONSOLE_URL, CONSOLE_PKI (dir), CONSOLE_SCENARIO (flow |
// unreachable | static | access), CONSOLE_DATA (JSON: leases, database names),
// CONSOLE_SCREENSHOTS (a directory, or empty: none), CHROMIUM.

import { chromium } from "playwright-core";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";

const url = need("CONSOLE_URL");
const pki = need("CONSOLE_PKI");
const scenario = need("CONSOLE_SCENARIO");
const data = JSON.parse(process.env.CONSOLE_DATA || "{}");
const shots = process.env.CONSOLE_SCREENSHOTS || "";
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";

function need(name) {
  const v = process.env[name];
  if (!v) fail(`${name} is not set`);
  return v;
}

function fail(msg) {
  console.error(`console_flow: ${msg}`);
  process.exit(1);
}

function check(cond, msg) {
  if (!cond) throw new Error(msg);
}

const ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/// A fresh browser profile presenting `cert` to the console.
async function browserAs(cert, options = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "credbroker-console-"));
  const context = await chromium.launchPersistentContext(dir, {
    executablePath,
    args: ARGS,
    headless: true,
    viewport: { width: 1500, height: 900 },
    clientCertificates: [{ origin: url, ...cert }],
    ...options,
  });
  // Any CSP violation or script error shows up here: the pages must need
  // nothing the policy forbids.
  // ("Failed to load resource" is Chromium's note on any 4xx answer; the
  // 400 and 403 pages below are on purpose.)
  const problems = [];
  context.on("weberror", (e) => problems.push(`page error: ${e.error().message}`));
  const page = context.pages()[0] || (await context.newPage());
  page.on("console", (m) => {
    if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) {
      problems.push(`console error: ${m.text()}`);
    }
  });
  return { context, page, problems, dir };
}

const admin = { pfxPath: path.join(pki, "admin.p12"), passphrase: "credbroker-dev" };
const other = { certPath: path.join(pki, "other.pem"), keyPath: path.join(pki, "other-key.pem") };

async function shot(page, name) {
  if (!shots) return;
  fs.mkdirSync(shots, { recursive: true });
  await page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });
}

async function go(page, where, status = 200) {
  const resp = await page.goto(url + where);
  check(resp, `no response for ${where}`);
  check(resp.status() === status, `${where}: status ${resp.status()}, expected ${status}`);
  return resp;
}

async function leaseRows(page) {
  return page.$$eval("#leases tbody tr", (rows) => rows.map((r) => r.getAttribute("data-lease")));
}

async function flow() {
  const { context, page, problems } = await browserAs(admin);
  try {
    // 1. The leases an app just took, each with its details.
    const resp = await go(page, "/leases");
    const h = resp.headers();
    check(
      (h["content-security-policy"] || "").includes("default-src 'none'") &&
        h["content-security-policy"].includes("script-src 'self'") &&
        h["content-security-policy"].includes("frame-ancestors 'none'"),
      `CSP header: ${h["content-security-policy"]}`,
    );
    check(h["x-frame-options"] === "DENY", `X-Frame-Options: ${h["x-frame-options"]}`);
    check(h["cache-control"] === "no-store", `Cache-Control: ${h["cache-control"]}`);
    const all = await leaseRows(page);
    for (const l of data.leases) {
      check(all.includes(l.id), `lease ${l.id} (${l.database}) not listed: ${all}`);
      const row = page.locator(`tr[data-lease="${l.id}"]`);
      const text = await row.innerText();
      for (const want of [l.identity, l.role, l.database, l.username, "active"]) {
        check(text.includes(want), `row of ${l.id} lacks ${want}: ${text}`);
      }
    }
    check((await page.innerText("#total")) === String(data.leases.length), "total count");
    const html = await page.content();
    for (const l of data.leases) check(!html.includes(l.password), "a password is on the page");
    await shot(page, "leases");

    // 2. Filters narrow the table, in the store.
    const maria = data.leases.filter((l) => l.database === data.maria);
    await page.selectOption("#f-database", data.maria);
    await Promise.all([page.waitForURL(/database=/), page.click("#apply")]);
    let rows = await leaseRows(page);
    check(rows.length === maria.length && rows.every((id) => maria.some((l) => l.id === id)),
      `database filter: ${rows}`);
    await page.goto(url + "/leases?identity=" + encodeURIComponent(data.otherIdentity));
    rows = await leaseRows(page);
    const others = data.leases.filter((l) => l.identity === data.otherIdentity);
    check(rows.length === others.length && rows.every((id) => others.some((l) => l.id === id)),
      `identity filter: ${rows}`);
    await page.goto(url + "/leases?within=1h&sort=-expires");
    rows = await leaseRows(page);
    check(rows.length === data.leases.length, `within 1h: ${rows.length}`);
    await page.goto(url + "/leases?within=5s");
    rows = await leaseRows(page);
    check(rows.length === 0, `within 5s should match none: ${rows}`);

    // 3. Bad input: a clear error, and the form keeps what was typed.
    await page.goto(url + "/leases");
    await page.fill("#f-within", "banana");
    await page.fill("#f-identity", "bare-name");
    const bad = await Promise.all([page.waitForNavigation(), page.click("#apply")]);
    check(bad[0].status() === 400, `bad filter status ${bad[0].status()}`);
    const err = await page.innerText("#error");
    check(/identity|kind|spiffe/i.test(err), `bad identity error: ${err}`);
    check((await page.inputValue("#f-within")) === "banana", "typed 'within' lost");
    check((await page.inputValue("#f-identity")) === "bare-name", "typed identity lost");
    await page.goto(url + "/leases?within=banana");
    check(/banana/.test(await page.innerText("#error")), "bad duration not named");
    await shot(page, "leases-bad-filter");

    // 4. Revoke one lease from its row, behind the browser's confirm.
    const target = data.leases.find((l) => l.id === data.revokeOne);
    await page.goto(url + "/leases");
    let asked = "";
    page.once("dialog", async (d) => {
      asked = d.message();
      await d.accept();
    });
    await Promise.all([
      page.waitForURL(/\/leases\/revoke$/),
      page.click(`tr[data-lease="${target.id}"] form.revoke button`),
    ]);
    check(asked.includes(target.id), `confirm dialog: ${asked}`);
    const done = await page.innerText("#message");
    check(/1 lease revoked/.test(done), `revoke result: ${done}`);
    await shot(page, "revoked");
    await page.click("#back");
    rows = await leaseRows(page);
    check(!rows.includes(target.id), "the revoked lease is still listed as live");
    // A dismissed confirm posts nothing.
    const keep = data.leases.find((l) => l.id === data.keep);
    page.once("dialog", (d) => d.dismiss());
    await page.click(`tr[data-lease="${keep.id}"] form.revoke button`);
    await page.waitForTimeout(300);
    check(new URL(page.url()).pathname === "/leases", "a dismissed confirm navigated");

    // 5. Revoke every lease the filter selects: the confirmation states the count.
    await page.goto(url + "/leases?database=" + encodeURIComponent(data.maria));
    await page.click("#revoke-all");
    await page.waitForURL(/revoke-matching/);
    const confirmText = await page.innerText("#confirm-count");
    check(confirmText.includes(String(maria.length)), `confirmation count: ${confirmText}`);
    await shot(page, "confirm");
    await Promise.all([page.waitForNavigation(), page.click("#confirm")]);
    const bulk = await page.innerText("#message");
    check(new RegExp(`${maria.length} leases? revoked`).test(bulk), `bulk result: ${bulk}`);

    // 6. A state-changing POST without the CSRF token, or with another
    // token, is refused.
    const req = context.request;
    const noToken = await req.post(url + "/leases/revoke", { form: { lease_id: keep.id } });
    check(noToken.status() === 403, `POST without CSRF: ${noToken.status()}`);
    const forged = await req.post(url + "/leases/revoke", {
      form: { lease_id: keep.id, csrf: "00".repeat(32) },
    });
    check(forged.status() === 403, `POST with a forged CSRF token: ${forged.status()}`);
    const lockNoToken = await req.post(url + "/locks", {
      form: { kind: "role", value: keep.role, reason: "csrf test" },
    });
    check(lockNoToken.status() === 403, `lock POST without CSRF: ${lockNoToken.status()}`);

    // 7. Overview: every database reachable, counts, charts.
    await go(page, "/");
    for (const db of data.databases) {
      const row = await page.innerText(`tr[data-database="${db}"]`);
      check(/reachable/.test(row) && !/UNREACHABLE/.test(row), `overview ${db}: ${row}`);
    }
    check((await page.locator("svg rect.bar").count()) === 120, "two charts of 60 minutes");
    await shot(page, "overview");

    // 8. Audit: the page's revocations under the admin's identity, chain intact.
    await go(page, "/audit?action=admin_revoke");
    const chain = await page.innerText("#chain");
    check(/verifies/.test(chain), `audit chain: ${chain}`);
    const audit = await page.innerText("#audit tbody");
    check(audit.includes(target.id) && audit.includes(data.adminIdentity), `audit rows: ${audit}`);
    await page.goto(url + "/audit?outcome=denied");
    check((await page.innerText("#audit tbody")).includes("console"), "refusals not in audit");
    await go(page, "/audit?outcome=maybe", 400);
    await go(page, "/audit");
    await shot(page, "audit");

    // 9. Locks: create, bad input kept, remove.
    await go(page, "/locks");
    await page.selectOption("#l-kind", "identity");
    await page.fill("#l-value", "bare-name");
    await page.fill("#l-reason", "INC-42 test");
    await Promise.all([page.waitForNavigation(), page.click("#lock")]);
    check(/kind|spiffe|dns/i.test(await page.innerText("#error")), "bad lock target error");
    check((await page.inputValue("#l-reason")) === "INC-42 test", "typed reason lost");
    await page.selectOption("#l-kind", "role");
    await page.fill("#l-value", keep.role);
    await page.fill("#l-duration", "1h");
    await Promise.all([page.waitForNavigation(), page.click("#lock")]);
    check(/Locked/.test(await page.innerText("h1")), "lock not created");
    await page.click("#back");
    const lockRow = page.locator("#locks tbody tr[data-lock]");
    check((await lockRow.count()) === 1, "the new lock is not listed");
    check((await lockRow.innerText()).includes("INC-42 test"), "lock reason not shown");
    await shot(page, "locks");
    page.once("dialog", (d) => d.accept());
    await Promise.all([page.waitForNavigation(), lockRow.locator("button").click()]);
    check(/lifted/.test(await page.innerText("#message")), "lock not lifted");
    await page.click("#back");
    check((await page.locator("#locks tbody tr[data-lock]").count()) === 0, "lock still listed");

    check(problems.length === 0, `browser problems: ${problems.join("; ")}`);
    // The policy is enforced, and the watch above would have seen a breach:
    // an inline style added now is refused by Chromium, and reported.
    await page.evaluate(() => {
      const s = document.createElement("style");
      s.textContent = "body { background: red; }";
      document.head.appendChild(s);
    });
    await page.waitForTimeout(200);
    check(problems.some((p) => /inline style violates the following Content Security Policy/.test(p)),
      `an inline style was not refused: ${problems}`);
  } finally {
    await context.close();
  }

  // 10. Without JavaScript: reading works, and a single revoke asks on a
  // page of its own before anything happens.
  const nojs = await browserAs(admin, { javaScriptEnabled: false });
  try {
    await go(nojs.page, "/leases");
    const keep = data.leases.find((l) => l.id === data.keep);
    check((await leaseRows(nojs.page)).includes(keep.id), "no-script listing");
    await Promise.all([
      nojs.page.waitForNavigation(),
      nojs.page.click(`tr[data-lease="${keep.id}"] form.revoke button`),
    ]);
    const ask = await nojs.page.innerText("#confirm-count");
    check(ask.includes(keep.username), `no-script confirmation: ${ask}`);
    await shot(nojs.page, "confirm-one-no-script");
    await nojs.page.click("#cancel");
    check((await leaseRows(nojs.page)).includes(keep.id), "cancelled revoke revoked");
  } finally {
    await nojs.context.close();
  }

  // 11. A certificate that is not an admin's sees a 403 page and nothing else.
  const o = await browserAs(other);
  try {
    for (const where of ["/", "/leases", "/audit", "/locks"]) {
      await go(o.page, where, 403);
      const body = await o.page.innerText("body");
      check(/Access refused/.test(body), `non-admin on ${where}: ${body}`);
      for (const l of data.leases) check(!body.includes(l.username), "non-admin sees a lease");
    }
    await shot(o.page, "forbidden");
    const post = await o.context.request.post(url + "/leases/revoke", { form: { lease_id: data.keep } });
    check(post.status() === 403, `non-admin POST: ${post.status()}`);
  } finally {
    await o.context.close();
  }
}

async function staticRoles() {
  const name = data.staticRole;
  const [firstUser, secondUser] = data.users;
  const { context, page, problems } = await browserAs(admin);
  try {
    await go(page, "/");
    await Promise.all([page.waitForNavigation(), page.click('nav a[href="/static-roles"]')]);
    check(new URL(page.url()).pathname === "/static-roles", `tab went to ${page.url()}`);
    const row = page.locator(`#static-roles tr[data-static-role="${name}"]`);
    const text = await row.innerText();
    for (const want of [data.database, "alternating", firstUser]) {
      check(text.includes(want), `row of ${name} lacks ${want}: ${text}`);
    }
    check((await row.locator("td.generation").innerText()) === String(data.generation), `generation: ${text}`);
    check(!(await page.content()).includes(data.password), "a password is on the page");
    await shot(page, "static-roles");
    // Revoke asks first; dismissed, nothing happens.
    let asked = "";
    page.once("dialog", (d) => {
      asked = d.message();
      d.dismiss();
    });
    await row.locator("form.revoke button").click();
    await page.waitForTimeout(200);
    check(/passwords are replaced and their sessions ended/.test(asked), `revoke dialog: ${asked}`);
    check(new URL(page.url()).pathname === "/static-roles", "a dismissed revoke navigated");
    // Rotate now, accepted.
    page.once("dialog", (d) => d.accept());
    await Promise.all([
      page.waitForURL(/\/static-roles\/rotate$/),
      row.locator("form.rotate button").click(),
    ]);
    const result = await page.innerText("#message");
    check(result.includes(`current user ${secondUser} (generation ${data.generation + 1})`), `rotate: ${result}`);
    check(result.includes(`previous user ${firstUser} keeps working`), `rotate overlap: ${result}`);
    await page.click("#back");
    const after = page.locator(`#static-roles tr[data-static-role="${name}"]`);
    check((await after.locator("td.generation").innerText()) === String(data.generation + 1), "generation not moved");
    check((await after.locator("td.current-user").innerText()) === secondUser, "current user not moved");
    check(problems.length === 0, `browser problems: ${problems.join("; ")}`);
  } finally {
    await context.close();
  }

  // Without JavaScript: "Rotate now" asks on a page first; cancel changes nothing.
  const nojs = await browserAs(admin, { javaScriptEnabled: false });
  try {
    await go(nojs.page, "/static-roles");
    await Promise.all([
      nojs.page.waitForNavigation(),
      nojs.page.click(`tr[data-static-role="${name}"] form.rotate button`),
    ]);
    const ask = await nojs.page.innerText("#confirm-text");
    check(ask.includes(name) && ask.includes(secondUser), `no-script confirmation: ${ask}`);
    await nojs.page.click("#cancel");
    const gen = await nojs.page.innerText(`tr[data-static-role="${name}"] td.generation`);
    check(gen === String(data.generation + 1), `a cancelled rotation rotated: ${gen}`);
  } finally {
    await nojs.context.close();
  }

  // A certificate that is not an admin's: 403, and its POST changes nothing.
  const o = await browserAs(other);
  try {
    await go(o.page, "/static-roles", 403);
    const body = await o.page.innerText("body");
    check(/Access refused/.test(body) && !body.includes(firstUser), `non-admin: ${body}`);
    const post = await o.context.request.post(url + "/static-roles/rotate", {
      form: { static_role: name, confirmed: "yes" },
    });
    check(post.status() === 403, `non-admin POST: ${post.status()}`);
  } finally {
    await o.context.close();
  }
}

// The Access page: the request made over gRPC is pending; a forged CSRF
// token is refused and decides nothing; Approve (confirmed) grants it.
async function access() {
  const { context, page, problems } = await browserAs(admin);
  try {
    await go(page, "/");
    await Promise.all([page.waitForNavigation(), page.click('nav a[href="/access"]')]);
    check(new URL(page.url()).pathname === "/access", `tab went to ${page.url()}`);
    const row = page.locator(`#access tr[data-request="${data.request}"]`);
    let text = await row.innerText();
    for (const want of ["incident", "ro", data.requester, "INC-88: orders stuck", "pending", "0/1", "pending until"]) {
      check(text.includes(want), `row of ${data.request} lacks ${want}: ${text}`);
    }
    await shot(page, "access");
    // The page's own token with one character changed: 403, nothing decided.
    const token = await row.locator("form.approve input[name=csrf]").inputValue();
    const forged = (token[0] === "0" ? "1" : "0") + token.slice(1);
    const post = await context.request.post(url + "/access/approve", {
      form: { csrf: forged, request_id: data.request },
    });
    check(post.status() === 403, `forged token POST: ${post.status()}`);
    check(/CSRF token/.test(await post.text()), "forged token: the refusal does not say why");
    await page.reload();
    text = await row.innerText();
    check(/pending/.test(text) && text.includes("0/1"), `after a forged POST: ${text}`);
    // Approve, behind the browser's confirm.
    let asked = "";
    page.once("dialog", async (d) => {
      asked = d.message();
      await d.accept();
    });
    await Promise.all([page.waitForURL(/\/access\/approve$/), row.locator("form.approve button").click()]);
    check(asked.includes(data.request), `confirm dialog: ${asked}`);
    const done = await page.innerText("#message");
    check(/is granted/.test(done) && done.includes(data.requester), `approve result: ${done}`);
    await page.click("#back");
    const after = page.locator(`#access tr[data-request="${data.request}"]`);
    text = await after.innerText();
    check(/granted until/.test(text) && text.includes("1/1"), `after approve: ${text}`);
    check((await after.locator("form.revoke").count()) === 1, "a live grant has no Revoke");
    check((await after.locator("form.approve").count()) === 0, "a granted request still offers Approve");
    await shot(page, "access-granted");
    check(problems.length === 0, `browser problems: ${problems.join("; ")}`);
  } finally {
    await context.close();
  }
}

async function unreachable() {
  const { context, page, problems } = await browserAs(admin);
  try {
    await go(page, "/");
    const row = await page.innerText(`tr[data-database="${data.stopped}"]`);
    check(/UNREACHABLE/.test(row), `stopped database shown as: ${row}`);
    check(/unknown/.test(row), `failsafe status of a stopped database: ${row}`);
    await shot(page, "overview-unreachable");
    // A revoke while the database is away: the page says it failed and
    // will be retried; the row then shows the attempt and its error.
    await go(page, "/leases");
    page.once("dialog", (d) => d.accept());
    await Promise.all([
      page.waitForURL(/\/leases\/revoke$/),
      page.click(`tr[data-lease="${data.lease}"] form.revoke button`),
    ]);
    const result = await page.innerText("main");
    check(/Not revoked yet/.test(result) && /will be retried/.test(result), `revoke while down: ${result}`);
    await page.click("#back");
    const leaseRow = page.locator(`tr[data-lease="${data.lease}"]`);
    const attempts = Number(await leaseRow.locator("td").nth(8).innerText());
    check(attempts >= 1, `revocation attempts shown: ${attempts}`);
    check((await leaseRow.locator("td.last-error").innerText()).length > 0, "last error not shown");
    await shot(page, "leases-failing-revocation");
    check(problems.length === 0, `browser problems: ${problems.join("; ")}`);
  } finally {
    await context.close();
  }
}

try {
  if (scenario === "flow") await flow();
  else if (scenario === "unreachable") await unreachable();
  else if (scenario === "static") await staticRoles();
  else if (scenario === "access") await access();
  else fail(`unknown scenario ${scenario}`);
  console.log(`console_flow: ${scenario} ok`);
} catch (e) {
  fail(e.stack || String(e));
}
