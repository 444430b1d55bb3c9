"""The worker's requests to the gateway: ``a2a.<agent>.work.event`` and ``a2a.<agent>.work.card``.

Design decision: every reply is classified once, here, into what the runner does next —
accepted (go on; maybe cancel), stop (409 stale attempt / terminal task, 404 not this agent's
task: stop and ack), skip (the gateway refused this one event as bad: drop it, go on), or retry
(no gateway, timeout, 401/403 while a token rotates, 5xx) with bounded backoff; when retries run
out the runner abandons the item unacked, so JetStream redelivers it as a new attempt.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.client import Client as NATS

from .token import TokenError, TokenSource

log = logging.getLogger(__name__)

SERVICE_ERROR = "Nats-Service-Error"
SERVICE_ERROR_CODE = "Nats-Service-Error-Code"


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    STOP = "stop"
    SKIP = "skip"
    RETRY = "retry"


@dataclass
class Reply:
    outcome: Outcome
    state: str | None = None
    cancel_requested: bool = False
    seq: int | None = None
    status: int | None = None
    detail: str = ""


class GatewayUnavailable(Exception):
    """The gateway did not take an event within the retry deadline."""


def classify(headers: dict[str, str] | None, data: bytes) -> Reply:
    """One gateway reply (headers, body) -> what to do."""
    headers = headers or {}
    code = headers.get(SERVICE_ERROR_CODE)
    if code is None:
        try:
            body = json.loads(data) if data else {}
        except ValueError:
            return Reply(Outcome.RETRY, detail="reply is not JSON")
        if not isinstance(body, dict):
            return Reply(Outcome.RETRY, detail="reply is not a JSON object")
        seq = body.get("seq")
        return Reply(
            Outcome.ACCEPTED,
            state=body.get("state") if isinstance(body.get("state"), str) else None,
            cancel_requested=body.get("cancelRequested") is True,
            seq=seq if isinstance(seq, int) else None,
        )
    try:
        status = int(code)
    except ValueError:
        status = 500
    detail = headers.get(SERVICE_ERROR, "")
    try:
        problem = json.loads(data) if data else {}
        if isinstance(problem, dict) and isinstance(problem.get("detail"), str):
            detail = problem["detail"]
    except ValueError:
        pass
    if status in (404, 409):
        outcome = Outcome.STOP
    elif 400 <= status < 500 and status not in (401, 403, 408, 429):
        outcome = Outcome.SKIP
    else:
        outcome = Outcome.RETRY
    return Reply(outcome, status=status, detail=detail)


class Gateway:
    """Requests from one worker (agent ``agent_id``) to the gateway, each with the current bearer."""

    def __init__(
        self,
        nc: NATS,
        agent_id: str,
        token: TokenSource | None,
        request_timeout: float = 10.0,
        retry_deadline: float = 60.0,
    ) -> None:
        self._nc = nc
        self.agent_id = agent_id
        self._token = token
        self._timeout = request_timeout
        self._retry_deadline = retry_deadline

    def _headers(self) -> dict[str, str] | None:
        if self._token is None:
            return None
        return self._token.bearer()

    async def _request_once(self, subject: str, body: dict[str, Any]) -> Reply:
        payload = json.dumps(body, separators=(",", ":")).encode()
        try:
            msg = await self._nc.request(subject, payload, timeout=self._timeout, headers=self._headers())
        except TokenError as e:
            return Reply(Outcome.RETRY, detail=str(e))
        except nats.errors.NoRespondersError:
            return Reply(Outcome.RETRY, detail="no gateway answers")
        except (nats.errors.TimeoutError, asyncio.TimeoutError):
            return Reply(Outcome.RETRY, detail="gateway timeout")
        except nats.errors.Error as e:
            return Reply(Outcome.RETRY, detail=f"bus error: {e}")
        return classify(msg.headers, msg.data)

    async def _request(self, subject: str, body: dict[str, Any]) -> Reply:
        deadline = time.monotonic() + self._retry_deadline
        delay = 0.2
        while True:
            reply = await self._request_once(subject, body)
            if reply.outcome is not Outcome.RETRY:
                return reply
            if time.monotonic() + delay > deadline:
                raise GatewayUnavailable(f"{subject}: {reply.detail or reply.status}")
            log.warning("%s: %s (status %s); retrying in %.1fs", subject, reply.detail, reply.status, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def post_event(self, space: str, task_id: str, attempt: int, event: dict[str, Any]) -> Reply:
        """``a2a.<agent>.work.event``; retries until accepted, refused, or the deadline."""
        body = {"space": space, "taskId": task_id, "attempt": attempt, "event": event}
        return await self._request(f"a2a.{self.agent_id}.work.event", body)

    async def post_card(self, card: dict[str, Any]) -> Reply:
        """``a2a.<agent>.work.card`` once (the caller repeats it every 30 s anyway)."""
        return await self._request_once(f"a2a.{self.agent_id}.work.card", card)
