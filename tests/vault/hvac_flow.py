"""One step of a Vault client's life, done with hvac exactly as an
application would, for tests/it/vault_api.rs: the Rust test runs a step,
reads the JSON this prints, and checks the database and the broker.

    hvac_flow.py URL CERT KEY CA STEP [ARG...]

Steps:
    login                   auth.cert.login(), then is_authenticated()
    creds TOKEN ROLE        secrets.database.generate_credentials(name=ROLE)
    lookup TOKEN LEASE      sys.read_lease
    renew TOKEN LEASE INC   sys.renew_lease(increment=INC; "-" for none)
    revoke TOKEN LEASE      sys.revoke_lease
    renew_self TOKEN INC    auth.token.renew_self(increment=INC; "-" for none)
    revoke_self TOKEN       auth.token.revoke_self()
    is_authenticated TOKEN  is_authenticated()
    get TOKEN PATH          the adapter's GET of PATH (health, mounts, a
                            path the broker does not serve)
    raw TOKEN METHOD PATH BODY
                            the adapter's METHOD of PATH with BODY sent as
                            is (malformed requests); "@N" sends N bytes
    headers TOKEN METHOD PATH BODY
                            METHOD of PATH over hvac's own HTTP session
                            (its certificate, CA and token header); prints
                            the status and the response headers only

Prints {"ok": <response>} or {"error": <hvac exception class>,
"errors": [...]}; exits 0 either way, so the Rust test asserts on the
outcome. TOKEN "-" means none.
"""

import json
import sys

import hvac
import hvac.exceptions


def response_json(r):
    """hvac returns a dict for JSON bodies, a requests.Response otherwise."""
    if isinstance(r, dict):
        return r
    if r is None:
        return None
    body = r.text
    return {"status_code": r.status_code, "body": json.loads(body) if body else None}


def main():
    url, cert, key, ca, step, *args = sys.argv[1:]
    token = None
    if step != "login" and args:
        token = None if args[0] == "-" else args[0]
        args = args[1:]
    client = hvac.Client(url=url, cert=(cert, key), verify=ca, token=token)
    try:
        if step == "login":
            r = client.auth.cert.login()
            out = {"login": r, "is_authenticated": client.is_authenticated()}
        elif step == "creds":
            out = client.secrets.database.generate_credentials(name=args[0])
        elif step == "static_creds":
            out = client.secrets.database.get_static_credentials(name=args[0])
        elif step == "lookup":
            out = client.sys.read_lease(lease_id=args[0])
        elif step == "renew":
            inc = None if args[1] == "-" else int(args[1])
            out = client.sys.renew_lease(lease_id=args[0], increment=inc)
        elif step == "revoke":
            out = response_json(client.sys.revoke_lease(lease_id=args[0]))
        elif step == "renew_self":
            inc = None if args[0] == "-" else args[0]
            out = client.auth.token.renew_self(increment=inc)
        elif step == "revoke_self":
            out = response_json(client.auth.token.revoke_self())
        elif step == "is_authenticated":
            out = client.is_authenticated()
        elif step == "get":
            out = response_json(client.adapter.get(args[0]))
        elif step == "raw":
            method, path, body = args
            if body.startswith("@"):
                body = "x" * int(body[1:])
            out = response_json(
                client.adapter.request(method, path, raise_exception=False, data=body)
            )
        elif step == "headers":
            method, path, body = args
            r = client.adapter.session.request(
                method,
                url + path,
                data=body or None,
                headers={"X-Vault-Token": token} if token else {},
                cert=(cert, key),
                verify=ca,
            )
            out = {
                "status_code": r.status_code,
                "headers": {k.lower(): v for k, v in r.headers.items()},
            }
        else:
            raise SystemExit(f"unknown step {step!r}")
        print(json.dumps({"ok": out}))
    except hvac.exceptions.VaultError as e:
        print(json.dumps({"error": type(e).__name__, "errors": e.errors or []}))


if __name__ == "__main__":
    main()
