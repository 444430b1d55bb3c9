"""The worker process: ``python -m tether_a2a.worker --agent A --executor mod:Class``.

Binds to the gateway's durable pull consumer ``work_<agent>`` on ``A2A_WORK`` (never creates
it), fetches one item per free slot (``--max-concurrency``), runs each through ``runner``,
listens for ``a2a.<agent>.signal.cancel`` and re-publishes the agent card every 30 s.

Design decision: the fetch loop takes a slot before it fetches, so a worker never holds more
work than it can run (unstarted items would otherwise burn their ack_wait in its buffer), and
shutdown is "stop fetching, let running items finish until the grace runs out, leave the rest
unacked for another worker".
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
from a2a.server.agent_execution import AgentExecutor
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from .card import CardError, load_card
from .events import BadWorkItem
from .gateway import Gateway, GatewayUnavailable, Outcome
from .runner import End, ItemRun, fail_bad_item, prepare
from .secret_env import SecretEnvError
from .secret_env import load as load_secret_env
from .token import TokenError, TokenSource

log = logging.getLogger("tether_a2a.worker")

WORK_STREAM = "A2A_WORK"
CARD_INTERVAL = 30.0
DEFAULT_ACK_WAIT = 30.0


class ConfigError(Exception):
    """Bad command line or environment (exit 64)."""


def load_executor(spec: str) -> AgentExecutor:
    """``module:Class`` -> an instance (no arguments), checked to be an a2a-sdk AgentExecutor."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--executor must be <module>:<Class>, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        raise ConfigError(f"cannot import {module_name}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ConfigError(f"{module_name} has no {attr}")
    executor = obj() if isinstance(obj, type) else obj
    if not isinstance(executor, AgentExecutor):
        raise ConfigError(f"{spec} is not an a2a.server.agent_execution.AgentExecutor")
    return executor


class Worker:
    """One agent's worker: connection, fetch loop, running items, card heartbeat."""

    def __init__(
        self,
        agent_id: str,
        executor: AgentExecutor,
        card: dict[str, Any],
        nats_url: str,
        token: TokenSource | None,
        max_concurrency: int = 4,
        shutdown_grace: float = 25.0,
        cancel_grace: float = 5.0,
        fetch_timeout: float = 5.0,
        card_interval: float = CARD_INTERVAL,
    ) -> None:
        self.agent_id = agent_id
        self.executor = executor
        self.card = card
        self.nats_url = nats_url
        self.token = token
        self.max_concurrency = max_concurrency
        self.shutdown_grace = shutdown_grace
        self.cancel_grace = cancel_grace
        self.fetch_timeout = fetch_timeout
        self.card_interval = card_interval
        self.ack_wait = DEFAULT_ACK_WAIT
        self.running: dict[tuple[str, str], ItemRun] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(max_concurrency)
        self.nc: NATS | None = None
        self.gateway: Gateway | None = None
        self._last_bus_error = ""

    async def connect(self) -> NATS:
        opts: dict[str, Any] = {
            "servers": self.nats_url,
            "name": f"tether-a2a {self.agent_id}",
            "inbox_prefix": f"_INBOX.{self.agent_id}",
            # Retry forever, the first connect too: a worker may start before the bus.
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 1,
            "error_cb": self._on_bus_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        if self.token is not None:
            opts["token"] = self.token  # a callable: nats-py re-reads it on every (re)connect
        self.nc = await nats.connect(**opts)
        self.gateway = Gateway(self.nc, self.agent_id, self.token)
        return self.nc

    async def _on_bus_error(self, err: Exception) -> None:
        text = f"{type(err).__name__}: {err}"
        if text != self._last_bus_error:  # one line per distinct error, not one per retry
            log.warning("bus: %s", text)
            self._last_bus_error = text

    async def _on_disconnected(self) -> None:
        log.warning("bus: disconnected; reconnecting")

    async def _on_reconnected(self) -> None:
        self._last_bus_error = ""
        log.info("bus: reconnected")

    async def run(self, shutdown: Awaitable[Any]) -> None:
        """Serve until ``shutdown`` resolves, then drain (up to ``shutdown_grace``)."""
        nc = self.nc or await self.connect()
        js = nc.jetstream()
        try:
            info = await js.consumer_info(WORK_STREAM, f"work_{self.agent_id}")
            if info.config.ack_wait:
                self.ack_wait = float(info.config.ack_wait)
        except nats.errors.Error as e:
            log.warning("consumer info failed (%s); assuming ack_wait %.0fs", e, self.ack_wait)
        psub = await js.pull_subscribe_bind(durable=f"work_{self.agent_id}", stream=WORK_STREAM)
        cancel_sub = await nc.subscribe(f"a2a.{self.agent_id}.signal.cancel", cb=self._on_cancel)
        card_task = asyncio.create_task(self._card_loop())
        fetch_task = asyncio.create_task(self._fetch_loop(psub))
        stop_task = asyncio.ensure_future(shutdown)
        log.info(
            "agent %s: serving (max concurrency %d, ack_wait %.0fs)", self.agent_id, self.max_concurrency, self.ack_wait
        )
        try:
            await asyncio.wait({fetch_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            fetch_task.cancel()
            stop_task.cancel()
            await asyncio.gather(fetch_task, stop_task, return_exceptions=True)
            await self._drain()
            card_task.cancel()
            await asyncio.gather(card_task, return_exceptions=True)
            await cancel_sub.unsubscribe()
            await psub.unsubscribe()
            await nc.drain()

    async def _drain(self) -> None:
        if not self._tasks:
            return
        log.info("shutting down: waiting up to %.0fs for %d running item(s)", self.shutdown_grace, len(self._tasks))
        _, pending = await asyncio.wait(set(self._tasks), timeout=self.shutdown_grace)
        if pending:
            log.warning("%d item(s) still running after the grace; leaving them unacked", len(pending))
            for run in list(self.running.values()):
                run.abandon("worker shutting down")
            await asyncio.wait(pending, timeout=self.cancel_grace + 1)

    async def _fetch_loop(self, psub: Any) -> None:
        while True:
            await self._slots.acquire()
            try:
                msgs = await psub.fetch(1, timeout=self.fetch_timeout)
            except (nats.errors.TimeoutError, asyncio.TimeoutError):
                self._slots.release()
                continue
            except asyncio.CancelledError:
                self._slots.release()
                raise
            except Exception as e:  # reconnecting, or the consumer is not there yet
                self._slots.release()
                log.warning("fetch failed: %s", e)
                await asyncio.sleep(1.0)
                continue
            if not msgs:
                self._slots.release()
                continue
            task = asyncio.create_task(self._handle(msgs[0]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: Msg) -> None:
        try:
            await self._handle_item(msg)
        except Exception:
            log.exception("work item failed unexpectedly; left unacked for redelivery")
        finally:
            self._slots.release()

    async def _handle_item(self, msg: Msg) -> None:
        assert self.gateway is not None
        attempt = msg.metadata.num_delivered
        heartbeat = asyncio.create_task(self._heartbeat(msg))
        try:
            try:
                item, context = prepare(msg.data)
            except BadWorkItem as e:
                end = await fail_bad_item(self.gateway, msg.data, attempt, e)
            else:
                run = ItemRun(self.executor, self.gateway, item, context, attempt, self.cancel_grace)
                key = (item.space, item.task_id)
                self.running[key] = run
                try:
                    end = await run.run()
                finally:
                    if self.running.get(key) is run:
                        del self.running[key]
        finally:
            heartbeat.cancel()
        if end is End.ACK:
            await msg.ack()
        elif end is End.TERM:
            await msg.term()

    async def _heartbeat(self, msg: Msg) -> None:
        interval = max(self.ack_wait / 3.0, 0.5)
        while True:
            await asyncio.sleep(interval)
            try:
                await msg.in_progress()
            except Exception as e:
                log.warning("in-progress ack failed: %s", e)

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            body = json.loads(msg.data)
            key = (body["space"], body["taskId"])
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed cancel signal")
            return
        run = self.running.get(key)
        if run is not None:
            run.request_cancel()

    async def _card_loop(self) -> None:
        assert self.gateway is not None
        while True:
            try:
                reply = await self.gateway.post_card(self.card)
                if reply.outcome is not Outcome.ACCEPTED:
                    log.warning("card refused: %s %s", reply.status, reply.detail)
            except GatewayUnavailable as e:
                log.warning("card not published: %s", e)
            await asyncio.sleep(self.card_interval)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tether_a2a.worker",
        description="Run an a2a-sdk AgentExecutor as a tether A2A worker. "
        "Bus from TETHER_NATS_URL; token from TETHER_TOKEN or TETHER_TOKEN_FILE.",
    )
    p.add_argument("--agent", required=True, help="the agent id (the token's sub)")
    p.add_argument("--executor", required=True, help="<module>:<Class> of an a2a-sdk AgentExecutor")
    p.add_argument("--card", help="an A2A 1.0 AgentCard JSON file (default: a card made from the agent id)")
    p.add_argument("--max-concurrency", type=int, default=4, help="items run at once (default 4)")
    p.add_argument("--shutdown-grace", type=float, default=25.0, help="seconds running items get on SIGTERM")
    p.add_argument("--log-level", default=os.environ.get("TETHER_LOG", "INFO"))
    return p.parse_args(argv)


def build(args: argparse.Namespace, env: dict[str, str] | os._Environ[str] = os.environ) -> Worker:
    if args.max_concurrency < 1:
        raise ConfigError("--max-concurrency must be at least 1")
    if not args.agent or any(c in args.agent for c in ".*> \t"):
        raise ConfigError(f"--agent {args.agent!r} is not a valid agent id (one subject token)")
    nats_url = env.get("TETHER_NATS_URL")
    if not nats_url:
        raise ConfigError("TETHER_NATS_URL is not set")
    try:
        token = TokenSource.from_env(env)
    except TokenError as e:
        raise ConfigError(str(e)) from e
    try:
        card = load_card(args.card, args.agent)
    except CardError as e:
        raise ConfigError(f"--card: {e}") from e
    executor = load_executor(args.executor)
    return Worker(
        args.agent,
        executor,
        card,
        nats_url,
        token,
        max_concurrency=args.max_concurrency,
        shutdown_grace=args.shutdown_grace,
    )


async def _amain(worker: Worker) -> None:
    loop = asyncio.get_running_loop()
    stop: asyncio.Future[None] = loop.create_future()

    def on_signal() -> None:
        if not stop.done():
            log.info("signal received: no more fetching, draining")
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    connecting = asyncio.ensure_future(worker.connect())
    await asyncio.wait({connecting, stop}, return_when=asyncio.FIRST_COMPLETED)
    if not connecting.done():  # stopped before the bus was ever reached
        connecting.cancel()
        await asyncio.gather(connecting, return_exceptions=True)
        return
    connecting.result()
    await worker.run(stop)


def main(argv: list[str] | None = None, runner: Callable[[Worker], Awaitable[None]] = _amain) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        # Before anything else, so whatever the executor spawns inherits it.
        names = load_secret_env()
        if names:
            log.info("loaded %d variables from TETHER_ENV_FILE", len(names))
        worker = build(args)
    except SecretEnvError as e:
        print(f"tether-a2a: error: TETHER_ENV_FILE: {e}", file=sys.stderr)
        return 64
    except ConfigError as e:
        print(f"tether-a2a: error: {e}", file=sys.stderr)
        return 64
    try:
        asyncio.run(runner(worker))
    except (OSError, nats.errors.Error) as e:
        print(f"tether-a2a: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
