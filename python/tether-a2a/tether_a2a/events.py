"""a2a-sdk protobuf objects <-> A2A 1.0 ProtoJSON, and the work item a worker receives.

Design decision: no hand-written field mapping. An enqueued event is wrapped in the SDK's own
``StreamResponse`` (``a2a.utils.proto_utils.to_stream_response``) and rendered with protobuf's
``MessageToDict`` exactly as the SDK's JSON-RPC server renders it (camelCase fields, enum names
``TASK_STATE_*`` / ``ROLE_*``, RFC 3339 timestamps); incoming JSON is parsed leniently (unknown
fields ignored), as A2A requires. ProtoJSON omits empty fields; the few that strict parsers (the
Rust ``a2a-lf`` types the gateway uses) require — ``parts`` of a message or artifact, the
``contextId`` of a task or event — are written out even when empty.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from a2a.server.agent_execution import RequestContext
from a2a.server.context import ServerCallContext
from a2a.types.a2a_pb2 import (
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    Task,
    TaskArtifactUpdateEvent,
    TaskState,
    TaskStatus,
    TaskStatusUpdateEvent,
)
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError

TERMINAL_STATES = frozenset(
    {
        "TASK_STATE_COMPLETED",
        "TASK_STATE_FAILED",
        "TASK_STATE_CANCELED",
        "TASK_STATE_REJECTED",
    }
)
INTERRUPTED_STATES = frozenset({"TASK_STATE_INPUT_REQUIRED", "TASK_STATE_AUTH_REQUIRED"})
FINAL_STATES = TERMINAL_STATES | INTERRUPTED_STATES


class BadWorkItem(ValueError):
    """A work item that cannot be turned into a request context."""


def to_stream_response(event: Any) -> dict[str, Any]:
    """One enqueued event (Task | Message | TaskStatusUpdateEvent | TaskArtifactUpdateEvent)
    as StreamResponse ProtoJSON: ``{"task": …}`` | ``{"message": …}`` | ``{"statusUpdate": …}``
    | ``{"artifactUpdate": …}``. Raises TypeError for anything else."""
    resp = StreamResponse()
    if isinstance(event, Task):
        resp.task.CopyFrom(event)
    elif isinstance(event, Message):
        resp.message.CopyFrom(event)
    elif isinstance(event, TaskStatusUpdateEvent):
        resp.status_update.CopyFrom(event)
    elif isinstance(event, TaskArtifactUpdateEvent):
        resp.artifact_update.CopyFrom(event)
    else:
        raise TypeError(f"not an A2A event: {type(event).__name__}")
    out = MessageToDict(resp, preserving_proto_field_name=False)
    _fill_required(out)
    return out


def _fill_required(resp: dict[str, Any]) -> None:
    """Write out the empty fields a strict A2A parser requires (see the module doc)."""

    def message(m: Any) -> None:
        if isinstance(m, dict):
            m.setdefault("parts", [])

    def artifact(a: Any) -> None:
        if isinstance(a, dict):
            a.setdefault("parts", [])

    def status(s: Any) -> None:
        if isinstance(s, dict):
            message(s.get("message"))

    if "task" in resp:
        task = resp["task"]
        task.setdefault("contextId", "")
        status(task.get("status"))
        for a in task.get("artifacts", []):
            artifact(a)
        for m in task.get("history", []):
            message(m)
    elif "message" in resp:
        message(resp["message"])
    elif "statusUpdate" in resp:
        resp["statusUpdate"].setdefault("contextId", "")
        status(resp["statusUpdate"].get("status"))
    elif "artifactUpdate" in resp:
        resp["artifactUpdate"].setdefault("contextId", "")
        artifact(resp["artifactUpdate"].get("artifact"))


def event_state(event: Any) -> str | None:
    """The task state an event moves the task to, by name (None: no state change).

    A ``message`` event completes the task (wire contract §4), so it counts as COMPLETED."""
    if isinstance(event, TaskStatusUpdateEvent):
        return TaskState.Name(event.status.state)
    if isinstance(event, Task):
        return TaskState.Name(event.status.state)
    if isinstance(event, Message):
        return "TASK_STATE_COMPLETED"
    return None


def status_event(task_id: str, context_id: str, state: int, text: str | None = None) -> TaskStatusUpdateEvent:
    """A status update the worker itself emits (FAILED on an executor error, CANCELED when a
    cancelled executor reported nothing), shaped like TaskUpdater's."""
    status = TaskStatus(state=state)
    status.timestamp.FromDatetime(datetime.now(timezone.utc))
    if text:
        status.message.CopyFrom(
            Message(
                message_id=str(uuid.uuid4()),
                role=Role.ROLE_AGENT,
                task_id=task_id,
                context_id=context_id,
                parts=[Part(text=text)],
            )
        )
    return TaskStatusUpdateEvent(task_id=task_id, context_id=context_id, status=status)


@dataclass
class WorkItem:
    """A parsed work item: ``{"space", "task": Task, "message": Message}`` (wire contract §3)."""

    space: str
    task: Task
    message: Message

    @property
    def task_id(self) -> str:
        return self.task.id

    @property
    def context_id(self) -> str:
        return self.task.context_id

    @classmethod
    def parse(cls, data: bytes | str) -> WorkItem:
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise BadWorkItem(f"work item is not JSON: {e}") from e
        if not isinstance(obj, dict):
            raise BadWorkItem("work item is not a JSON object")
        space = obj.get("space")
        if not isinstance(space, str) or not space:
            raise BadWorkItem("work item has no space")
        task_json, msg_json = obj.get("task"), obj.get("message")
        if not isinstance(task_json, dict) or not isinstance(msg_json, dict):
            raise BadWorkItem("work item needs a task and a message object")
        try:
            task = ParseDict(task_json, Task(), ignore_unknown_fields=True)
            message = ParseDict(msg_json, Message(), ignore_unknown_fields=True)
        except ParseError as e:
            raise BadWorkItem(f"work item task/message is not A2A ProtoJSON: {e}") from e
        if not task.id:
            raise BadWorkItem("work item task has no id")
        return cls(space=space, task=task, message=message)

    @staticmethod
    def ids(data: bytes | str) -> tuple[str, str] | None:
        """(space, task id) of a work item too broken to parse fully, if they can be read."""
        try:
            obj = json.loads(data)
            space, task_id = obj["space"], obj["task"]["id"]
        except (ValueError, UnicodeDecodeError, KeyError, TypeError):
            return None
        if isinstance(space, str) and isinstance(task_id, str) and space and task_id:
            return space, task_id
        return None

    def tether_metadata(self) -> dict[str, Any]:
        """``task.metadata.tether`` as set by the gateway (callerAgentId, space, agentId)."""
        meta = MessageToDict(self.task.metadata) if self.task.HasField("metadata") else {}
        tether = meta.get("tether")
        return tether if isinstance(tether, dict) else {}

    def request_context(self) -> RequestContext:
        """The RequestContext the a2a-sdk server would build: the message as the request, the
        stored task as current task, its ids. The space is the A2A tenant; the gateway's
        ``metadata.tether`` (the verified caller) is in ``call_context.state["tether"]``."""
        message = Message()
        message.CopyFrom(self.message)
        call_context = ServerCallContext(tenant=self.space, state={"tether": self.tether_metadata()})
        task = Task()
        task.CopyFrom(self.task)
        return RequestContext(
            call_context=call_context,
            request=SendMessageRequest(message=message),
            task_id=self.task.id,
            context_id=self.task.context_id or None,
            task=task,
        )
