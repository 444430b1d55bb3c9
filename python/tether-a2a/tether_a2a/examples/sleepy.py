"""A plain a2a-sdk ``AgentExecutor``, written the way the a2a-sdk docs show (TaskUpdater:
start_work, add_artifact, complete) — it knows nothing about tether.

- ``sleep <ms>``: works for that long (a cancel interrupts it), then completes.
- ``ask``: asks for input (INPUT_REQUIRED); the follow-up message completes the task with an
  artifact holding both texts ("ask" and the follow-up).
- ``fail``: raises (the runner records FAILED).
- anything else: completes with an artifact ``echo: <text>``.
"""

import asyncio

from a2a.helpers import new_task_from_user_message, new_text_message, new_text_part
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.tasks import TaskUpdater
from a2a.types import Role, TaskState


class SleepyExecutor(AgentExecutor):
    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        task = context.current_task
        if task is None:
            task = new_task_from_user_message(context.message)
            await event_queue.enqueue_event(task)
        updater = TaskUpdater(event_queue, task.id, task.context_id)
        text = context.get_user_input().strip()

        if task.status.state == TaskState.TASK_STATE_INPUT_REQUIRED or _asked_before(context):
            await updater.start_work()
            question = _previous_user_text(context)
            await updater.add_artifact([new_text_part(f"{question} -> {text}")], name="answer")
            await updater.complete()
            return

        if text == "ask":
            await updater.requires_input(
                new_text_message("what should I do?", context_id=task.context_id, task_id=task.id, role=Role.ROLE_AGENT)
            )
            return

        if text == "fail":
            raise RuntimeError("asked to fail")

        await updater.start_work()
        if text.startswith("sleep "):
            ms = int(text.split()[1])
            await asyncio.sleep(ms / 1000)
            await updater.add_artifact([new_text_part(f"slept {ms} ms")], name="result")
        else:
            await updater.add_artifact([new_text_part(f"echo: {text}")], name="result")
        await updater.complete()

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        updater = TaskUpdater(event_queue, context.task_id, context.context_id)
        await updater.cancel()


def _user_texts(context: RequestContext) -> list[str]:
    """Texts of the task's earlier user messages (the current one excluded)."""
    task = context.current_task
    if task is None:
        return []
    current = context.message.message_id if context.message else ""
    return [
        "\n".join(p.text for p in m.parts if p.HasField("text"))
        for m in task.history
        if m.role == Role.ROLE_USER and m.message_id != current
    ]


def _asked_before(context: RequestContext) -> bool:
    return "ask" in [t.strip() for t in _user_texts(context)]


def _previous_user_text(context: RequestContext) -> str:
    texts = _user_texts(context)
    return texts[-1].strip() if texts else "ask"
