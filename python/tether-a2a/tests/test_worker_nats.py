"""Integration: the worker process (``python -m tether_a2a.worker``) against a real nats-server.

STAND-IN FOR THE GATEWAY: until the Rust a2a-gateway runs here, this test plays its part — it
creates the ``A2A_WORK`` stream and the ``work_<agent>`` consumer as the gateway would, publishes
work items, and answers ``a2a.<agent>.work.event`` / ``.work.card`` with a nats-py responder that
records every request (headers and body). The server runs without auth, so the bearer token is
checked as a header only. Skipped when no nats-server binary is found
(``TETHER_NATS_SERVER``, else ``~/.cache/tether/nats-current/bin/nats-server``).
"""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest
import uuid

import nats
from nats.js.api import AckPolicy, ConsumerConfig, StorageType

AGENT = "bob"
SPACE = "s1"
HERE = os.path.dirname(os.path.abspath(__file__))
PKG_ROOT = os.path.dirname(HERE)


def nats_server_bin():
    path = os.environ.get("TETHER_NATS_SERVER") or os.path.expanduser("~/.cache/tether/nats-current/bin/nats-server")
    return path if os.path.exists(path) else shutil.which("nats-server")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def eventually(check, timeout=10.0, what="condition"):
    """Wait (with a deadline) until the async check returns a truthy value."""
    deadline = time.monotonic() + timeout
    while True:
        got = await check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def work_item(text, task_id=None):
    task_id = task_id or str(uuid.uuid4())
    msg = {"messageId": str(uuid.uuid4()), "role": "ROLE_USER", "parts": [{"text": text}], "contextId": "c1", "taskId": task_id}
    task = {"id": task_id, "contextId": "c1", "status": {"state": "TASK_STATE_SUBMITTED"}, "history": [msg]}
    return task_id, json.dumps({"space": SPACE, "task": task, "message": msg}).encode()


@unittest.skipUnless(nats_server_bin(), "no nats-server binary")
class WorkerOnNatsTest(unittest.IsolatedAsyncioTestCase):
    SERVER_TOKEN = None  # the server's --auth token (None: no auth)

    def start_server(self, token=None):
        args = [nats_server_bin(), "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", self.tmp]
        if token:
            args += ["--auth", token]
        self.server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def asyncSetUp(self):
        self.tmp = tempfile.mkdtemp(prefix="tether-a2a-test-")
        self.port = free_port()
        self.current_token = self.SERVER_TOKEN
        self.start_server(self.SERVER_TOKEN)
        self.url = f"nats://127.0.0.1:{self.port}"

        async def connected():
            async def quiet(_err):
                pass

            opts = {"token": lambda: self.current_token} if self.SERVER_TOKEN else {}
            opts["error_cb"] = quiet
            try:
                return await nats.connect(self.url, max_reconnect_attempts=-1, connect_timeout=0.5,
                                          reconnect_time_wait=0.2, allow_reconnect=True, **opts)
            except Exception:
                return None

        self.nc = await eventually(connected, what="nats-server to listen")
        self.js = self.nc.jetstream()
        # As the gateway does (wire contract §3): stream, durable pull consumer per agent.
        await self.js.add_stream(name="A2A_WORK", subjects=["a2a_work.>"], storage=StorageType.FILE)
        await self.js.add_consumer(
            "A2A_WORK",
            ConsumerConfig(
                durable_name=f"work_{AGENT}",
                filter_subject=f"a2a_work.{AGENT}",
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=2.0,
                max_deliver=5,
            ),
        )
        self.events = asyncio.Queue()
        self.cards = asyncio.Queue()
        self.replies = {}  # task id -> list of reply overrides (bytes, headers) used in order
        self.seq = {}
        await self.nc.subscribe(f"a2a.{AGENT}.work.event", cb=self._on_event)
        await self.nc.subscribe(f"a2a.{AGENT}.work.card", cb=self._on_card)
        self.token_file = os.path.join(self.tmp, "token")
        with open(self.token_file, "w") as f:
            f.write(f"{self.SERVER_TOKEN or 'tok-1'}\n")
        self.worker_log = open(os.path.join(self.tmp, "worker.log"), "w")
        env = dict(os.environ, TETHER_NATS_URL=self.url, TETHER_TOKEN_FILE=self.token_file, PYTHONPATH=PKG_ROOT)
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "tether_a2a.worker", "--agent", AGENT,
             "--executor", "tether_a2a.examples.sleepy:SleepyExecutor", "--max-concurrency", "2",
             "--shutdown-grace", "10"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=self.worker_log,
        )
        self.card = await asyncio.wait_for(self.cards.get(), 15)

    async def asyncTearDown(self):
        if self.worker.poll() is None:
            self.worker.kill()
        self.worker.wait()
        self.worker_log.close()
        await self.nc.close()
        self.server.terminate()
        self.server.wait()
        await asyncio.sleep(0)
        if os.environ.get("TETHER_KEEP_TMP"):
            print("kept", self.tmp)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # --- the stand-in gateway ------------------------------------------------------------------
    async def _on_event(self, msg):
        body = json.loads(msg.data)
        await self.events.put((dict(msg.headers or {}), body))
        overrides = self.replies.get(body["taskId"])
        if overrides:
            data, headers = overrides.pop(0)
            await self.nc.publish(msg.reply, data, headers=headers)
            return
        n = self.seq[body["taskId"]] = self.seq.get(body["taskId"], 0) + 1
        ev = body["event"]
        state = ev["statusUpdate"]["status"]["state"] if "statusUpdate" in ev else "TASK_STATE_WORKING"
        await msg.respond(json.dumps({"state": state, "cancelRequested": False, "seq": n}).encode())

    async def _on_card(self, msg):
        await self.cards.put((dict(msg.headers or {}), json.loads(msg.data)))
        await msg.respond(b"{}")

    async def next_event(self, timeout=10):
        return await asyncio.wait_for(self.events.get(), timeout)

    async def events_until_final(self, timeout=15):
        out = []
        while True:
            headers, body = await self.next_event(timeout)
            out.append((headers, body))
            ev = body["event"]
            if "statusUpdate" in ev and ev["statusUpdate"]["status"]["state"] in (
                "TASK_STATE_COMPLETED", "TASK_STATE_FAILED", "TASK_STATE_CANCELED", "TASK_STATE_INPUT_REQUIRED"):
                return out

    async def all_acked(self):
        async def check():
            info = await self.js.consumer_info("A2A_WORK", f"work_{AGENT}")
            return info.num_ack_pending == 0 and info.num_pending == 0 and info
        return await eventually(check, what="the work item to be acked")

    # --- tests ----------------------------------------------------------------------------------
    async def test_card_published_with_bearer(self):
        headers, card = self.card
        self.assertEqual(headers.get("Authorization"), "Bearer tok-1")
        self.assertEqual(card["name"], AGENT)
        self.assertIn("capabilities", card)

    async def test_events_in_order_then_ack(self):
        task_id, data = work_item("hello")
        await self.js.publish(f"a2a_work.{AGENT}", data, headers={"Nats-Msg-Id": f"{SPACE}.{task_id}.m"})
        got = await self.events_until_final()
        kinds = [next(iter(b["event"])) for _, b in got]
        self.assertEqual(kinds, ["statusUpdate", "artifactUpdate", "statusUpdate"])
        self.assertEqual([b["event"]["statusUpdate"]["status"]["state"] for _, b in got if "statusUpdate" in b["event"]],
                         ["TASK_STATE_WORKING", "TASK_STATE_COMPLETED"])
        for headers, body in got:
            self.assertEqual(headers.get("Authorization"), "Bearer tok-1")
            self.assertEqual((body["space"], body["taskId"], body["attempt"]), (SPACE, task_id, 1))
        art = got[1][1]["event"]["artifactUpdate"]
        self.assertEqual(art["taskId"], task_id)
        self.assertEqual(art["artifact"]["parts"], [{"text": "echo: hello"}])
        info = await self.all_acked()
        self.assertEqual(info.ack_floor.stream_seq, 1)

    async def test_cancel_signal(self):
        task_id, data = work_item("sleep 30000")
        await self.js.publish(f"a2a_work.{AGENT}", data)
        _, first = await self.next_event()
        self.assertEqual(first["event"]["statusUpdate"]["status"]["state"], "TASK_STATE_WORKING")
        await self.nc.publish(f"a2a.{AGENT}.signal.cancel", json.dumps({"space": "other", "taskId": task_id}).encode())
        await self.nc.publish(f"a2a.{AGENT}.signal.cancel", json.dumps({"space": SPACE, "taskId": task_id}).encode())
        _, second = await self.next_event()
        self.assertEqual(second["event"]["statusUpdate"]["status"]["state"], "TASK_STATE_CANCELED")
        await self.all_acked()
        self.assertTrue(self.events.empty())

    async def test_cancel_requested_in_reply_and_token_rotation(self):
        task_id, data = work_item("sleep 30000")
        self.replies[task_id] = [(b'{"state":"TASK_STATE_WORKING","cancelRequested":true,"seq":1}', None)]
        with open(self.token_file + ".new", "w") as f:
            f.write("tok-2-rotated\n")
        os.replace(self.token_file + ".new", self.token_file)
        await self.js.publish(f"a2a_work.{AGENT}", data)
        got = await self.events_until_final()
        self.assertEqual([b["event"]["statusUpdate"]["status"]["state"] for _, b in got],
                         ["TASK_STATE_WORKING", "TASK_STATE_CANCELED"])
        self.assertEqual({h.get("Authorization") for h, _ in got}, {"Bearer tok-2-rotated"})
        await self.all_acked()

    async def test_conflict_stops_and_acks(self):
        task_id, data = work_item("sleep 30000")
        problem = json.dumps({"status": 409, "detail": "task is terminal", "a2aError": "UnsupportedOperation"}).encode()
        self.replies[task_id] = [(problem, {"Nats-Service-Error": "Conflict", "Nats-Service-Error-Code": "409"})]
        await self.js.publish(f"a2a_work.{AGENT}", data)
        _, first = await self.next_event()
        self.assertEqual(first["event"]["statusUpdate"]["status"]["state"], "TASK_STATE_WORKING")
        await self.all_acked()
        self.assertTrue(self.events.empty())

    async def test_heartbeat_keeps_a_long_item(self):
        # ack_wait is 2 s; the item runs 4 s: without in-progress acks it would be redelivered.
        task_id, data = work_item("sleep 4000")
        await self.js.publish(f"a2a_work.{AGENT}", data)
        got = await self.events_until_final(timeout=20)
        self.assertEqual(got[-1][1]["event"]["statusUpdate"]["status"]["state"], "TASK_STATE_COMPLETED")
        self.assertEqual({b["attempt"] for _, b in got}, {1})
        info = await self.all_acked()
        self.assertEqual(info.num_redelivered, 0)

    async def test_executor_error_and_bad_item(self):
        task_id, data = work_item("fail")
        await self.js.publish(f"a2a_work.{AGENT}", data)
        got = await self.events_until_final()
        self.assertEqual([b["event"]["statusUpdate"]["status"]["state"] for _, b in got], ["TASK_STATE_FAILED"])
        await self.js.publish(f"a2a_work.{AGENT}", json.dumps({"space": SPACE, "task": {"id": "t-bad", "status": 3}}).encode())
        _, bad = await self.next_event()
        self.assertEqual((bad["taskId"], bad["event"]["statusUpdate"]["status"]["state"]), ("t-bad", "TASK_STATE_FAILED"))
        await self.all_acked()

    async def test_sigterm_finishes_running_items(self):
        task_id, data = work_item("sleep 1500")
        await self.js.publish(f"a2a_work.{AGENT}", data)
        _, first = await self.next_event()
        self.assertEqual(first["event"]["statusUpdate"]["status"]["state"], "TASK_STATE_WORKING")
        self.worker.send_signal(signal.SIGTERM)
        got = await self.events_until_final()
        self.assertEqual(got[-1][1]["event"]["statusUpdate"]["status"]["state"], "TASK_STATE_COMPLETED")
        await self.all_acked()
        loop = asyncio.get_running_loop()
        rc = await asyncio.wait_for(loop.run_in_executor(None, self.worker.wait), 15)
        self.assertEqual(rc, 0)


@unittest.skipUnless(nats_server_bin(), "no nats-server binary")
class WorkerTokenRotationTest(WorkerOnNatsTest):
    """The token file is re-read on reconnect: the server restarts requiring a new token."""

    SERVER_TOKEN = "tok-1"

    async def test_reconnects_with_the_rotated_token(self):
        self.assertEqual(self.card[0].get("Authorization"), "Bearer tok-1")
        with open(self.token_file + ".new", "w") as f:
            f.write("tok-2\n")
        os.replace(self.token_file + ".new", self.token_file)
        self.current_token = "tok-2"
        self.server.terminate()
        self.server.wait()
        self.start_server("tok-2")  # the same store dir: stream and consumer survive

        async def reconnected():
            return self.nc.is_connected
        await eventually(reconnected, timeout=20, what="the test client to reconnect")
        task_id, data = work_item("after rotation")
        await eventually(lambda: self._publish(data), timeout=20, what="JetStream to come back")
        got = await self.events_until_final(timeout=30)
        self.assertEqual(got[-1][1]["event"]["statusUpdate"]["status"]["state"], "TASK_STATE_COMPLETED")
        self.assertEqual({h.get("Authorization") for h, _ in got}, {"Bearer tok-2"})
        await self.all_acked()

    async def _publish(self, data):
        try:
            await self.js.publish(f"a2a_work.{AGENT}", data, timeout=1)
            return True
        except Exception:
            return False

    # The inherited tests run with auth on as well.


if __name__ == "__main__":
    unittest.main()
