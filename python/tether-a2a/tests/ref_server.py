#!/usr/bin/env python3
"""Dev tool, not a test: the a2a-sdk's OWN JSON-RPC server running the example executor at
``/a2a/bob``, to check ``e2e_client.py`` (and the example) against the reference implementation
without tether. A request with ``Authorization: Bearer T2`` gets TaskNotFound, standing in for
"another space". Needs the SDK's server extra (``pip install --target DIR starlette
sse-starlette uvicorn``, then ``PYTHONPATH=DIR:python/tether-a2a``); install-deps does not
install it.

    python3 ref_server.py 18791 &
    python3 e2e_client.py --url http://127.0.0.1:18791/a2a/bob --token T1 --other-token T2
"""

import json
import sys

import uvicorn
from a2a.server.request_handlers.default_request_handler_v2 import DefaultRequestHandlerV2
from a2a.server.routes import create_agent_card_routes, create_jsonrpc_routes
from a2a.server.tasks import InMemoryTaskStore
from a2a.types.a2a_pb2 import AgentCapabilities, AgentCard, AgentInterface, AgentSkill
from starlette.applications import Starlette
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import JSONResponse

from tether_a2a.examples.sleepy import SleepyExecutor


def app(port: int) -> Starlette:
    base = f"http://127.0.0.1:{port}/a2a/bob"
    card = AgentCard(
        name="bob",
        description="reference server",
        version="1",
        capabilities=AgentCapabilities(streaming=True),
        supported_interfaces=[AgentInterface(url=base, protocol_binding="JSONRPC", protocol_version="1.0")],
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
        skills=[AgentSkill(id="sleepy", name="sleepy", description="sleeps, asks, echoes", tags=["test"])],
    )
    handler = DefaultRequestHandlerV2(agent_executor=SleepyExecutor(), task_store=InMemoryTaskStore(), agent_card=card)
    routes = create_jsonrpc_routes(handler, "/a2a/bob") + create_agent_card_routes(
        card, card_url="/a2a/bob/.well-known/agent-card.json"
    )
    application = Starlette(routes=routes)

    async def other_space(request, call_next):
        if request.headers.get("authorization") == "Bearer T2" and request.method == "POST":
            body = json.loads(await request.body())
            # JSON-RPC errors travel with HTTP 200: the SDK client maps error.code only then.
            return JSONResponse({"jsonrpc": "2.0", "id": body.get("id"), "error": {"code": -32001, "message": "Task not found"}})
        return await call_next(request)

    application.add_middleware(BaseHTTPMiddleware, dispatch=other_space)
    return application


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 18791
    uvicorn.run(app(port), host="127.0.0.1", port=port, log_level="warning")
