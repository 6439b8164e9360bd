#!/usr/bin/env python3
"""A real SMTP server for herald's tests (aiosmtpd).

Listens on 127.0.0.1 on a free port, prints `READY <port>` once it accepts
connections, and appends every message it receives to --out as one JSON line:
{"mail_from", "rcpt_tos", "data", "authenticated", "login"}.

With --user/--password it requires AUTH (PLAIN or LOGIN) with those
credentials; TLS is not offered, so the channel under test uses `tls: none`.
It exits when its stdin closes (the test process went away).
"""
import argparse
import asyncio
import json
import sys
import threading

try:
    from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
except ImportError:
    print("ERROR aiosmtpd is not installed: run `pip install aiosmtpd` (scripts/test.sh does)", flush=True)
    sys.exit(3)


class Recorder:
    def __init__(self, out):
        self.out = out

    async def handle_DATA(self, server, session, envelope):
        auth = getattr(session, "auth_data", None)
        login = auth.login.decode("utf-8", "replace") if isinstance(auth, LoginPassword) else None
        record = {
            "mail_from": envelope.mail_from,
            "rcpt_tos": envelope.rcpt_tos,
            "data": envelope.content.decode("utf-8", "replace"),
            "authenticated": bool(getattr(session, "authenticated", False)),
            "login": login,
        }
        with open(self.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        return "250 Message accepted for delivery"


def authenticator(user, password):
    def check(server, session, envelope, mechanism, auth_data):
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == user
            and auth_data.password.decode() == password
        )
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    return check


def exit_when_stdin_closes(loop):
    sys.stdin.read()
    loop.call_soon_threadsafe(loop.stop)


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--user")
    parser.add_argument("--password")
    args = parser.parse_args()
    options = {"hostname": "localhost"}  # no getfqdn(): it can stall on DNS
    if args.user:
        options.update(
            authenticator=authenticator(args.user, args.password or ""),
            auth_required=True,
            auth_require_tls=False,
        )
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(Recorder(args.out), **options), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    threading.Thread(target=exit_when_stdin_closes, args=(loop,), daemon=True).start()
    print(f"READY {port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except RuntimeError:
        # loop.stop() from the stdin watcher ends serve_forever this way.
        pass
