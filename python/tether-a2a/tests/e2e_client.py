#!/usr/bin/env python3
"""End-to-end check with the OFFICIAL a2a-sdk 1.3.0 client through the gateway's HTTP bridge.

Not a unit test (no ``test_`` prefix): the Rust end-to-end test starts a fleet (gateway, a
tether-a2a worker running ``tether_a2a.examples.sleepy:SleepyExecutor``) and runs

    python3 e2e_client.py --url http://127.0.0.1:8791/a2a/<agent> --token T --other-token T2

It checks: blocking send -> COMPLETED task with the executor's artifact; streaming send -> task,
WORKING, artifact, COMPLETED in that order; get_task; ask -> INPUT_REQUIRED, follow-up ->
COMPLETED with both texts; cancel of a "sleep 30000" task -> CANCELED; get_task with a token
of another space -> TaskNotFound. Prints one JSON summary on stdout; exit 1 on any failure.

a2a-sdk client facts used here: ``ClientFactory(ClientConfig(httpx_client=...))`` sets the
``A2A-Version: 1.0`` header on the shared httpx client (setdefault), ``create_from_url(url)``
fetches ``<url>/.well-known/agent-card.json`` with that client (so with our Authorization
header) and then talks JSON-RPC to the card's ``supportedInterfaces[].url``;
``streaming=False`` makes ``send_message`` a blocking ``SendMessage`` call.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
from a2a.client import ClientConfig, ClientFactory
from a2a.helpers import get_artifact_text
from a2a.types import Role, TaskState
from a2a.types.a2a_pb2 import (
    CancelTaskRequest,
    GetTaskRequest,
    Message,
    Part,
    SendMessageRequest,
    StreamResponse,
    Task,
)
from a2a.utils.errors import TaskNotFoundError


class CheckFailed(AssertionError):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


def state(task: Task) -> str:
    return TaskState.Name(task.status.state)


def user_message(text: str, task_id: str | None = None, context_id: str | None = None) -> SendMessageRequest:
    msg = Message(message_id=str(uuid.uuid4()), role=Role.ROLE_USER, parts=[Part(text=text)])
    if task_id:
        msg.task_id = task_id
    if context_id:
        msg.context_id = context_id
    return SendMessageRequest(message=msg)


def artifact_texts(task: Task) -> list[str]:
    return [get_artifact_text(a) for a in task.artifacts]


async def make_client(url: str, token: str, streaming: bool):
    http = httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60.0)
    factory = ClientFactory(ClientConfig(httpx_client=http, streaming=streaming))
    client = await factory.create_from_url(url)
    return client, http


async def one_task(client, req: SendMessageRequest) -> Task:
    """A blocking send: exactly one StreamResponse carrying the task."""
    got: list[StreamResponse] = [r async for r in client.send_message(req)]
    check(len(got) == 1 and got[0].HasField("task"), f"blocking send returned {[r.WhichOneof('payload') for r in got]}")
    return got[0].task


async def eventually(fn: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await fn()
        if got:
            return got
        if time.monotonic() > deadline:
            raise CheckFailed(f"timed out: {what}")
        await asyncio.sleep(0.1)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    blocking, h1 = await make_client(args.url, args.token, streaming=False)
    streaming, h2 = await make_client(args.url, args.token, streaming=True)
    other, h3 = await make_client(args.url, args.other_token, streaming=False)
    try:
        # 1. blocking send
        task = await one_task(blocking, user_message("hello"))
        check(state(task) == "TASK_STATE_COMPLETED", f"blocking send: state {state(task)}")
        check(artifact_texts(task) == ["echo: hello"], f"blocking send: artifacts {artifact_texts(task)}")
        summary["blocking"] = {"taskId": task.id, "state": state(task), "artifacts": artifact_texts(task)}

        # 2. streaming send: task, WORKING, artifact, COMPLETED in order
        seq: list[str] = []
        stream_task_id = ""
        async for resp in streaming.send_message(user_message("stream me")):
            kind = resp.WhichOneof("payload")
            if kind == "task":
                stream_task_id = resp.task.id
                seq.append("task")
            elif kind == "status_update":
                seq.append(TaskState.Name(resp.status_update.status.state))
            elif kind == "artifact_update":
                seq.append("artifact:" + get_artifact_text(resp.artifact_update.artifact))
            else:
                seq.append(kind or "?")
        want = ["task", "TASK_STATE_WORKING", "artifact:echo: stream me", "TASK_STATE_COMPLETED"]
        # The first chunk is the SUBMITTED snapshot; a late subscriber could also see WORKING first.
        check([s for s in seq if s != "TASK_STATE_SUBMITTED"] == want, f"streaming sequence {seq}")
        summary["streaming"] = {"taskId": stream_task_id, "sequence": seq}

        # 3. get_task
        got = await blocking.get_task(GetTaskRequest(id=task.id))
        check(got.id == task.id and state(got) == "TASK_STATE_COMPLETED", f"get_task: {got.id} {state(got)}")
        check(artifact_texts(got) == ["echo: hello"], f"get_task artifacts {artifact_texts(got)}")
        summary["get_task"] = {"state": state(got), "history": len(got.history)}

        # 4. input required, then the follow-up completes it
        asked = await one_task(blocking, user_message("ask"))
        check(state(asked) == "TASK_STATE_INPUT_REQUIRED", f"ask: state {state(asked)}")
        done = await one_task(blocking, user_message("blue", task_id=asked.id, context_id=asked.context_id))
        check(done.id == asked.id and state(done) == "TASK_STATE_COMPLETED", f"follow-up: {state(done)}")
        check(artifact_texts(done) == ["ask -> blue"], f"follow-up artifacts {artifact_texts(done)}")
        summary["input_required"] = {"taskId": done.id, "artifacts": artifact_texts(done)}

        # 5. cancel a long task once it runs
        req = user_message("sleep 30000")
        req.configuration.return_immediately = True
        sleeping = await one_task(blocking, req)

        async def working() -> bool:
            t = await blocking.get_task(GetTaskRequest(id=sleeping.id))
            return state(t) == "TASK_STATE_WORKING"

        await eventually(working, 20, "the sleep task to be WORKING")
        canceled = await blocking.cancel_task(CancelTaskRequest(id=sleeping.id))
        check(state(canceled) == "TASK_STATE_CANCELED", f"cancel: state {state(canceled)}")
        after = await blocking.get_task(GetTaskRequest(id=sleeping.id))
        check(state(after) == "TASK_STATE_CANCELED", f"after cancel: state {state(after)}")
        summary["cancel"] = {"taskId": sleeping.id, "state": state(after)}

        # 6. another space cannot see the task
        try:
            t = await other.get_task(GetTaskRequest(id=task.id))
            raise CheckFailed(f"other token got the task ({state(t)})")
        except TaskNotFoundError:
            summary["other_space"] = "TaskNotFound"
    finally:
        for c, h in ((blocking, h1), (streaming, h2), (other, h3)):
            await c.close()
            await h.aclose()
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", required=True, help="http://HOST:PORT/a2a/<agent>")
    p.add_argument("--token", required=True, help="a2a:call token of the caller")
    p.add_argument("--other-token", required=True, help="a2a:call token of a caller in another space")
    args = p.parse_args()
    try:
        summary = asyncio.run(run(args))
    except Exception as e:  # every failure becomes one JSON line and exit 1
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}))
        return 1
    print(json.dumps({"ok": True, **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
