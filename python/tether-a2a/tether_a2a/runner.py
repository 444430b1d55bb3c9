"""One work item, start to ack: build the RequestContext, run the executor, forward its events.

Design decision: three cooperating asyncio tasks per item — the executor (``execute``, or
``cancel`` then the cancellation of ``execute``, in the SDK's own order), a forwarder that posts
each enqueued event to ``a2a.<agent>.work.event`` strictly in order, and an in-progress
heartbeat. The item is acked only after the last event was answered; when no final state
(terminal or interrupted) was recorded by then, the worker records one itself: CANCELED after a
cancel, else FAILED — a task never stays WORKING behind an acked item. Abandoned items (the
gateway unreachable past the retry deadline, or shutdown past its grace) are left unacked for
JetStream to redeliver as a new attempt.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from typing import Any

from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.types.a2a_pb2 import TaskState

from .events import FINAL_STATES, BadWorkItem, WorkItem, event_state, status_event, to_stream_response
from .gateway import Gateway, GatewayUnavailable, Outcome
from .queue import ForwardingEventQueue

log = logging.getLogger(__name__)


class End(enum.Enum):
    ACK = "ack"
    TERM = "term"
    ABANDON = "abandon"


class ItemRun:
    """The run of one work item (one delivery attempt)."""

    def __init__(
        self,
        executor: AgentExecutor,
        gateway: Gateway,
        item: WorkItem,
        context: RequestContext,
        attempt: int,
        cancel_grace: float,
    ) -> None:
        self.executor = executor
        self.gateway = gateway
        self.item = item
        self.context = context
        self.attempt = attempt
        self.cancel_grace = cancel_grace
        self.queue = ForwardingEventQueue()
        self.state: str | None = None  # the task state as last recorded by the gateway
        self.cancel_requested = False
        self.stopped: str | None = None  # why the gateway refused further events
        self.abandoned: str | None = None
        self._wake = asyncio.Event()  # cancel, stop or abandon wanted

    # --- requests from outside (cancel signal, gateway replies, shutdown) ---------------------
    def request_cancel(self) -> None:
        if not self.cancel_requested:
            log.info("task %s/%s: cancel requested", self.item.space, self.item.task_id)
        self.cancel_requested = True
        self._wake.set()

    def stop(self, why: str) -> None:
        self.stopped = self.stopped or why
        self._wake.set()

    def abandon(self, why: str) -> None:
        self.abandoned = self.abandoned or why
        self._wake.set()

    # --- the run ---------------------------------------------------------------------------------
    async def run(self) -> End:
        forwarder = asyncio.create_task(self._forward())
        try:
            await self._drive()
        finally:
            await self.queue.close(immediate=bool(self.stopped or self.abandoned))
        await forwarder
        if self.abandoned:
            log.warning("task %s/%s: abandoned unacked (%s)", self.item.space, self.item.task_id, self.abandoned)
            return End.ABANDON
        if self.stopped:
            log.info("task %s/%s: gateway refused events (%s); acking", self.item.space, self.item.task_id, self.stopped)
            return End.ACK
        if self.state not in FINAL_STATES:
            if self.cancel_requested:
                final = status_event(self.item.task_id, self.item.context_id, TaskState.TASK_STATE_CANCELED)
            else:
                final = status_event(
                    self.item.task_id,
                    self.item.context_id,
                    TaskState.TASK_STATE_FAILED,
                    "the agent finished without reporting a final task state",
                )
            await self._post(final)
            if self.abandoned:
                return End.ABANDON
        return End.ACK

    async def _drive(self) -> None:
        """execute(); on a cancel: cancel() then cancel execute (the SDK's order)."""
        exec_task = asyncio.create_task(self.executor.execute(self.context, self.queue))
        wake = asyncio.create_task(self._wake.wait())
        try:
            await asyncio.wait({exec_task, wake}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            wake.cancel()
        if exec_task.done():
            self._log_executor_end(exec_task)
            if not exec_task.cancelled() and exec_task.exception() is not None:
                err = exec_task.exception()
                await self.queue.enqueue_event(
                    status_event(
                        self.item.task_id,
                        self.item.context_id,
                        TaskState.TASK_STATE_FAILED,
                        f"agent error: {type(err).__name__}: {err}",
                    )
                )
            return
        if self.cancel_requested and not (self.stopped or self.abandoned):
            try:
                await asyncio.wait_for(self.executor.cancel(self.context, self.queue), self.cancel_grace)
            except asyncio.TimeoutError:
                log.warning("task %s: executor.cancel did not return within %.1fs", self.item.task_id, self.cancel_grace)
            except Exception:
                log.exception("task %s: executor.cancel failed", self.item.task_id)
        exec_task.cancel()
        done, _ = await asyncio.wait({exec_task}, timeout=self.cancel_grace)
        if not done:
            log.warning("task %s: execute ignored cancellation for %.1fs; leaving it", self.item.task_id, self.cancel_grace)
        else:
            self._log_executor_end(exec_task)

    def _log_executor_end(self, exec_task: asyncio.Task[Any]) -> None:
        if exec_task.cancelled():
            return
        err = exec_task.exception()
        if err is not None:
            log.error("task %s: executor raised %s: %s", self.item.task_id, type(err).__name__, err, exc_info=err)

    async def _forward(self) -> None:
        while (event := await self.queue.next_event()) is not None:
            if self.stopped or self.abandoned:
                continue
            await self._post(event)

    async def _post(self, event: Any) -> None:
        try:
            body = to_stream_response(event)
        except TypeError as e:
            log.warning("task %s: executor enqueued %s; dropped", self.item.task_id, e)
            return
        try:
            reply = await self.gateway.post_event(self.item.space, self.item.task_id, self.attempt, body)
        except GatewayUnavailable as e:
            self.abandon(str(e))
            return
        if reply.outcome is Outcome.ACCEPTED:
            self.state = reply.state or event_state(event) or self.state
            if reply.cancel_requested:
                self.request_cancel()
        elif reply.outcome is Outcome.STOP:
            self.stop(f"{reply.status} {reply.detail}")
        else:
            log.warning(
                "task %s: gateway refused a %s event (%s %s); dropped",
                self.item.task_id,
                next(iter(body), "?"),
                reply.status,
                reply.detail,
            )


async def fail_bad_item(gateway: Gateway, data: bytes, attempt: int, err: Exception) -> End:
    """A work item that cannot be run: record FAILED if its task can be named, then TERM it."""
    ids = WorkItem.ids(data)
    log.error("bad work item (%s): %s", ids, err)
    if ids is not None:
        space, task_id = ids
        event = to_stream_response(status_event(task_id, "", TaskState.TASK_STATE_FAILED, f"bad work item: {err}"))
        try:
            await gateway.post_event(space, task_id, attempt, event)
        except GatewayUnavailable:
            return End.ABANDON
    return End.TERM


def prepare(data: bytes) -> tuple[WorkItem, RequestContext]:
    """Parse a work item and build its RequestContext; BadWorkItem on any problem."""
    item = WorkItem.parse(data)
    try:
        context = item.request_context()
    except Exception as e:  # the SDK raises InvalidParamsError on mismatched ids
        raise BadWorkItem(f"cannot build a request context: {e}") from e
    return item, context
