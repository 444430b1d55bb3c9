"""Unit tests: a2a-sdk events -> ProtoJSON StreamResponse, work items -> RequestContext,
gateway reply classification, cards, tokens, and one item's run against an in-process
stand-in gateway. Run: ``python3 -m unittest discover -s python/tether-a2a/tests``."""

import asyncio
import json
import os
import tempfile
import unittest

from a2a.helpers import new_text_message, new_text_part
from a2a.server.tasks import TaskUpdater
from a2a.types import Role, TaskState
from a2a.types.a2a_pb2 import Message, Part, Task, TaskStatus

from tether_a2a.card import CardError, load_card, normalise
from tether_a2a.events import BadWorkItem, WorkItem, event_state, to_stream_response
from tether_a2a.examples.sleepy import SleepyExecutor
from tether_a2a.gateway import Outcome, Reply, classify
from tether_a2a.queue import ForwardingEventQueue
from tether_a2a.runner import End, ItemRun, prepare
from tether_a2a.token import TokenSource

TASK_ID = "7c9e6679-7425-40de-944b-e07fc1f90ae7"
CTX_ID = "ctx-1"


def work_item(text: str = "hello", state: str = "TASK_STATE_SUBMITTED", extra_history=()) -> bytes:
    msg = {
        "messageId": "m-1",
        "role": "ROLE_USER",
        "parts": [{"text": text}],
        "contextId": CTX_ID,
        "taskId": TASK_ID,
        "someFutureField": 1,
    }
    task = {
        "id": TASK_ID,
        "contextId": CTX_ID,
        "status": {"state": state, "timestamp": "2026-12-06T20:00:00Z"},
        "history": [*extra_history, msg],
        "metadata": {"tether": {"callerAgentId": "alice", "space": "s1", "agentId": "bob"}},
    }
    return json.dumps({"space": "s1", "task": task, "message": msg}).encode()


async def collect(coro_fn):
    """Run coro_fn(queue) and return the events it enqueued."""
    q = ForwardingEventQueue()
    await coro_fn(q)
    await q.close()
    out = []
    while (e := await q.next_event()) is not None:
        out.append(e)
    return out


class TranslationTest(unittest.TestCase):
    def test_task_updater_events_are_a2a_protojson(self):
        async def produce(q):
            u = TaskUpdater(q, TASK_ID, CTX_ID)
            await u.start_work()
            await u.add_artifact([new_text_part("out")], artifact_id="a-1", name="result")
            await u.complete()

        events = asyncio.run(collect(produce))
        bodies = [to_stream_response(e) for e in events]
        self.assertEqual([next(iter(b)) for b in bodies], ["statusUpdate", "artifactUpdate", "statusUpdate"])
        working = bodies[0]["statusUpdate"]
        self.assertEqual(working["taskId"], TASK_ID)
        self.assertEqual(working["contextId"], CTX_ID)
        self.assertEqual(working["status"]["state"], "TASK_STATE_WORKING")
        self.assertRegex(working["status"]["timestamp"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
        art = bodies[1]["artifactUpdate"]
        self.assertEqual(art["artifact"], {"artifactId": "a-1", "name": "result", "parts": [{"text": "out"}]})
        self.assertNotIn("append", art)  # unset optional fields are omitted, as ProtoJSON does
        self.assertEqual(bodies[2]["statusUpdate"]["status"]["state"], "TASK_STATE_COMPLETED")
        self.assertEqual([event_state(e) for e in events], ["TASK_STATE_WORKING", None, "TASK_STATE_COMPLETED"])

    def test_message_and_task_events(self):
        m = new_text_message("hi", context_id=CTX_ID, task_id=TASK_ID, role=Role.ROLE_AGENT)
        body = to_stream_response(m)
        self.assertEqual(body["message"]["role"], "ROLE_AGENT")
        self.assertEqual(body["message"]["parts"], [{"text": "hi"}])
        self.assertEqual(body["message"]["taskId"], TASK_ID)
        self.assertEqual(event_state(m), "TASK_STATE_COMPLETED")

        t = Task(id=TASK_ID, context_id=CTX_ID, status=TaskStatus(state=TaskState.TASK_STATE_INPUT_REQUIRED))
        body = to_stream_response(t)
        self.assertEqual(body, {"task": {"id": TASK_ID, "contextId": CTX_ID, "status": {"state": "TASK_STATE_INPUT_REQUIRED"}}})

    def test_empty_required_fields_are_written(self):
        body = to_stream_response(Message(message_id="m", role=Role.ROLE_AGENT))
        self.assertEqual(body["message"]["parts"], [])
        body = to_stream_response(Task(id="t", status=TaskStatus(state=TaskState.TASK_STATE_WORKING)))
        self.assertEqual(body["task"]["contextId"], "")

    def test_data_and_raw_parts(self):
        from google.protobuf.struct_pb2 import Value

        v = Value()
        v.struct_value.update({"k": [1, "x"]})
        m = Message(message_id="m", role=Role.ROLE_AGENT, parts=[Part(data=v), Part(raw=b"\x00\x01", media_type="application/octet-stream")])
        parts = to_stream_response(m)["message"]["parts"]
        self.assertEqual(parts[0], {"data": {"k": [1.0, "x"]}})
        self.assertEqual(parts[1], {"raw": "AAE=", "mediaType": "application/octet-stream"})

    def test_not_an_event(self):
        with self.assertRaises(TypeError):
            to_stream_response({"statusUpdate": {}})


class WorkItemTest(unittest.TestCase):
    def test_request_context_is_what_the_sdk_builds(self):
        item, ctx = prepare(work_item("do it"))
        self.assertEqual(item.space, "s1")
        self.assertEqual(ctx.task_id, TASK_ID)
        self.assertEqual(ctx.context_id, CTX_ID)
        self.assertEqual(ctx.current_task.id, TASK_ID)
        self.assertEqual(ctx.current_task.status.state, TaskState.TASK_STATE_SUBMITTED)
        self.assertEqual(ctx.get_user_input(), "do it")
        self.assertEqual(ctx.message.task_id, TASK_ID)
        self.assertEqual(ctx.message.role, Role.ROLE_USER)
        self.assertEqual(ctx.tenant, "s1")
        self.assertEqual(ctx.call_context.state["tether"]["callerAgentId"], "alice")

    def test_bad_items(self):
        for data in [b"nope", b"[]", b'{"task":{"id":"t"},"message":{}}', b'{"space":"s","task":{"id":"t"}}',
                     b'{"space":"s","task":{"status":{"state":"NOT_A_STATE"}},"message":{}}',
                     b'{"space":"s","task":{},"message":{}}']:
            with self.subTest(data=data), self.assertRaises(BadWorkItem):
                prepare(data)
        self.assertEqual(WorkItem.ids(b'{"space":"s","task":{"id":"t","status":7}}'), ("s", "t"))
        self.assertIsNone(WorkItem.ids(b"nope"))


class ReplyTest(unittest.TestCase):
    def test_classify(self):
        ok = classify(None, b'{"state":"TASK_STATE_WORKING","cancelRequested":true,"seq":3}')
        self.assertEqual((ok.outcome, ok.state, ok.cancel_requested, ok.seq), (Outcome.ACCEPTED, "TASK_STATE_WORKING", True, 3))
        problem = json.dumps({"status": 409, "detail": "task is terminal", "a2aError": "UnsupportedOperation"}).encode()
        stop = classify({"Nats-Service-Error": "Conflict", "Nats-Service-Error-Code": "409"}, problem)
        self.assertEqual((stop.outcome, stop.status, stop.detail), (Outcome.STOP, 409, "task is terminal"))
        self.assertEqual(classify({"Nats-Service-Error-Code": "404"}, b"").outcome, Outcome.STOP)
        self.assertEqual(classify({"Nats-Service-Error-Code": "400"}, b"{}").outcome, Outcome.SKIP)
        for code in ("401", "403", "500", "503"):
            self.assertEqual(classify({"Nats-Service-Error-Code": code}, b"").outcome, Outcome.RETRY)
        self.assertEqual(classify(None, b"not json").outcome, Outcome.RETRY)


class CardTest(unittest.TestCase):
    def test_default_and_file(self):
        card = load_card(None, "bob")
        self.assertEqual(card["name"], "bob")
        self.assertEqual(card["capabilities"], {"streaming": True, "pushNotifications": False})
        self.assertEqual(card["supportedInterfaces"], [])
        self.assertEqual([s["id"] for s in card["skills"]], ["default"])
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump({"name": "x", "version": "1", "skills": [{"id": "s", "name": "S"}]}, f)
        try:
            card = load_card(f.name, "bob")
            self.assertEqual(card["skills"], [{"id": "s", "name": "S", "description": "", "tags": []}])
        finally:
            os.unlink(f.name)

    def test_bad_cards(self):
        for bad in [{"name": "x", "capabilitiez": {}}, {"description": "no name"}, {"name": "x", "skills": "no"}]:
            with self.subTest(card=bad), self.assertRaises(CardError):
                normalise(bad)
        with self.assertRaises(CardError):
            load_card("/nonexistent/card.json", "bob")


class TokenTest(unittest.TestCase):
    def test_file_is_reread_when_it_changes(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "token")
            with open(path, "w") as f:
                f.write("one\n")
            src = TokenSource.from_env({"TETHER_TOKEN_FILE": path, "TETHER_TOKEN": "ignored"})
            self.assertEqual(src(), "one")
            with open(path, "w") as f:
                f.write("two-longer\n")
            self.assertEqual(src.bearer(), {"Authorization": "Bearer two-longer"})
        self.assertEqual(TokenSource.from_env({"TETHER_TOKEN": " t "}).get(), "t")
        self.assertIsNone(TokenSource.from_env({}))


    def test_a_renewal_by_symlink_swap_is_followed(self):
        """The orchestrator renews a replica's token as two files and a link to the current one
        (crates/container-orchestrator/src/docker/files.rs); for an instant the link is gone."""
        with tempfile.TemporaryDirectory() as d:
            link = os.path.join(d, "token")
            with open(os.path.join(d, "token.a"), "w") as f:
                f.write("first-token")
            os.symlink("token.a", link)
            src = TokenSource.from_env({"TETHER_TOKEN_FILE": link})
            self.assertEqual(src(), "first-token")
            with open(os.path.join(d, "token.b"), "w") as f:
                f.write("second-token")
            os.remove(link)
            self.assertEqual(src(), "first-token", "no link for an instant: the last token read")
            os.symlink("token.b", link)
            self.assertEqual(src(), "second-token")


class StandInGateway:
    """In-process stand-in for the gateway's work.event endpoint (records bodies)."""

    def __init__(self, replies=None):
        self.events = []
        self.replies = replies or {}
        self.state = "TASK_STATE_SUBMITTED"

    async def post_event(self, space, task_id, attempt, event):
        self.events.append((space, task_id, attempt, event))
        reply = self.replies.get(len(self.events))
        if reply is not None:
            return reply
        kind = next(iter(event))
        if kind == "statusUpdate":
            self.state = event[kind]["status"]["state"]
        return Reply(Outcome.ACCEPTED, state=self.state)


def run_item(data, gateway, executor=None, during=None):
    async def go():
        item, ctx = prepare(data)
        run = ItemRun(executor or SleepyExecutor(), gateway, item, ctx, attempt=2, cancel_grace=2.0)
        task = asyncio.create_task(run.run())
        if during:
            await asyncio.wait_for(during(run), 10)
        return await asyncio.wait_for(task, 10)

    return asyncio.run(go())


def states(gateway):
    return [e[3]["statusUpdate"]["status"]["state"] if "statusUpdate" in e[3] else next(iter(e[3])) for e in gateway.events]


class RunTest(unittest.TestCase):
    def test_events_in_order_then_ack(self):
        gw = StandInGateway()
        self.assertEqual(run_item(work_item("hello"), gw), End.ACK)
        self.assertEqual(states(gw), ["TASK_STATE_WORKING", "artifactUpdate", "TASK_STATE_COMPLETED"])
        self.assertTrue(all(e[:3] == ("s1", TASK_ID, 2) for e in gw.events))
        self.assertEqual(gw.events[1][3]["artifactUpdate"]["artifact"]["parts"], [{"text": "echo: hello"}])

    def test_executor_error_is_failed(self):
        gw = StandInGateway()
        self.assertEqual(run_item(work_item("fail"), gw), End.ACK)
        self.assertEqual(states(gw), ["TASK_STATE_FAILED"])
        text = gw.events[0][3]["statusUpdate"]["status"]["message"]["parts"][0]["text"]
        self.assertIn("asked to fail", text)

    def test_cancel_calls_executor_cancel(self):
        gw = StandInGateway()

        async def cancel_when_working(run):
            while not gw.events:
                await asyncio.sleep(0.01)
            run.request_cancel()

        self.assertEqual(run_item(work_item("sleep 30000"), gw, during=cancel_when_working), End.ACK)
        self.assertEqual(states(gw), ["TASK_STATE_WORKING", "TASK_STATE_CANCELED"])

    def test_cancel_requested_in_a_reply(self):
        gw = StandInGateway({1: Reply(Outcome.ACCEPTED, state="TASK_STATE_WORKING", cancel_requested=True)})
        self.assertEqual(run_item(work_item("sleep 30000"), gw), End.ACK)
        self.assertEqual(states(gw), ["TASK_STATE_WORKING", "TASK_STATE_CANCELED"])

    def test_conflict_stops_and_acks(self):
        gw = StandInGateway({1: Reply(Outcome.STOP, status=409, detail="stale attempt")})
        self.assertEqual(run_item(work_item("sleep 30000"), gw), End.ACK)
        self.assertEqual(states(gw), ["TASK_STATE_WORKING"])

    def test_ask_then_follow_up(self):
        gw = StandInGateway()
        self.assertEqual(run_item(work_item("ask"), gw), End.ACK)
        self.assertEqual(states(gw), ["TASK_STATE_INPUT_REQUIRED"])
        first = {"messageId": "m-0", "role": "ROLE_USER", "parts": [{"text": "ask"}]}
        gw = StandInGateway()
        run_item(work_item("blue", state="TASK_STATE_INPUT_REQUIRED", extra_history=[first]), gw)
        self.assertEqual(states(gw), ["TASK_STATE_WORKING", "artifactUpdate", "TASK_STATE_COMPLETED"])
        self.assertEqual(gw.events[1][3]["artifactUpdate"]["artifact"]["parts"], [{"text": "ask -> blue"}])

    def test_no_final_state_becomes_failed(self):
        from a2a.server.agent_execution import AgentExecutor

        class Silent(AgentExecutor):
            async def execute(self, context, event_queue):
                await TaskUpdater(event_queue, context.task_id, context.context_id).start_work()

            async def cancel(self, context, event_queue):
                pass

        gw = StandInGateway()
        self.assertEqual(run_item(work_item("x"), gw, executor=Silent()), End.ACK)
        self.assertEqual(states(gw), ["TASK_STATE_WORKING", "TASK_STATE_FAILED"])


if __name__ == "__main__":
    unittest.main()
