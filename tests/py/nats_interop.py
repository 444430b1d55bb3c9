"""Independent-client interop: the official nats-py client talks to a tether node.

Usage: python3 nats_interop.py NATS_URL NODE_NAME SUBJECT
Prints one line per check; exits non-zero on the first failure.
"""
import asyncio
import json
import sys

import nats


async def main(url: str, node: str, subject: str) -> None:
    nc = await nats.connect(url)
    try:
        # A JSON request/reply.
        msg = await nc.request(subject, json.dumps({"message": "from python"}).encode(), timeout=5,
                               headers={"Content-Type": "application/json"})
        assert not (msg.headers or {}).get("Nats-Service-Error-Code"), msg.headers
        body = json.loads(msg.data)
        assert body["message"] == "from python", body
        print("request/reply ok")

        # A malformed request: a Problem+JSON error with both headers.
        msg = await nc.request(subject, b"{oops", timeout=5)
        assert msg.headers["Nats-Service-Error-Code"] == "400", msg.headers
        assert msg.headers["Nats-Service-Error"], msg.headers
        problem = json.loads(msg.data)
        assert problem["status"] == 400 and problem["detail"], problem
        print("problem ok")

        # The micro protocol.
        ping = json.loads((await nc.request(f"$SRV.PING.{node}", b"", timeout=5)).data)
        assert ping["type"] == "io.nats.micro.v1.ping_response" and ping["name"] == node, ping
        info = json.loads((await nc.request(f"$SRV.INFO.{node}", b"", timeout=5)).data)
        subjects = [e["subject"] for e in info["endpoints"]]
        assert subject in subjects, subjects
        print("ping/info ok")

        def count(stats):
            return next(e["num_requests"] for e in stats["endpoints"] if e["subject"] == subject)

        before = count(json.loads((await nc.request(f"$SRV.STATS.{node}", b"", timeout=5)).data))
        for _ in range(3):
            await nc.request(subject, b"{}", timeout=5)
        after = count(json.loads((await nc.request(f"$SRV.STATS.{node}", b"", timeout=5)).data))
        assert after == before + 3, (before, after)
        print("stats ok")
    finally:
        await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
