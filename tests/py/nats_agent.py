"""nats-py as an agent on the authorized bus: its tether token is the connection's credential.

Usage: python3 nats_agent.py URL TOKEN AGENT_ID

Connects with the token (the permission node answers the server's auth callout) and the
agent's own inbox prefix, calls `auth.keys`, then tries to subscribe to `>` and to publish on
`agents.register` (neither in its permissions). Prints `request ok` and `violations ok` when the
request was answered and the server reported both violations; exits 1 otherwise.
"""
import asyncio
import sys

import nats


async def main(url: str, token: str, agent: str) -> int:
    violations = []

    async def on_error(e):
        violations.append(str(e).lower())

    nc = await nats.connect(url, token=token, inbox_prefix=f"_INBOX.{agent}".encode(),
                            error_cb=on_error, max_reconnect_attempts=0)
    reply = await nc.request("auth.keys", b"{}", timeout=10)
    if b"keys" not in reply.data:
        print(f"unexpected auth.keys reply: {reply.data!r}")
        return 1
    print("request ok")
    await nc.subscribe(">")
    await nc.publish("agents.register", b"{}")
    await nc.flush()
    for _ in range(100):
        if len([v for v in violations if "permissions violation" in v]) >= 2:
            break
        await asyncio.sleep(0.1)
    found = [v for v in violations if "permissions violation" in v]
    if not any('">"' in v or "subscription" in v for v in found) or not any("agents.register" in v for v in found):
        print(f"violations not reported: {violations}")
        return 1
    print("violations ok")
    await nc.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3])))
