"""The official Python MCP client (`mcp` 2.x from PyPI) against tether's shell-server.

Usage: python3 mcp_shell.py PLAN_JSON

PLAN_JSON:
  {"transport": "stdio" | "http",
   "url": "http://127.0.0.1:PORT/mcp",             # http
   "token": "<jwt>" | null,                          # http: sent as `Authorization: Bearer`
   "server": {"command": "...", "args": [...], "env": {...}},   # stdio: launched as a subprocess
   "calls": [{"arguments": {...}, "name": "exec_command"}, ...],
   "parallel": false}                                # true: all calls at once (asyncio.gather)

Prints one JSON line: {"tools": [{"name", "input_schema"}], "results": [{"is_error", "text",
"structured"}], "error": null | "<what failed>"}. A transport or protocol failure (e.g. a 401)
is reported in "error", never as a traceback; the exit code is 0 unless the plan is unreadable.
"""
import asyncio
import json
import sys

import httpx2
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client


def describe(exc: BaseException) -> str:
    """Flattens exception groups (anyio task groups) into one readable line."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(describe(e) for e in exc.exceptions)
    text = f"{type(exc).__name__}: {exc}"
    response = getattr(exc, "response", None)
    if response is not None and getattr(response, "status_code", None) is not None:
        text += f" (HTTP {response.status_code})"
    return text


def content_text(result) -> str:
    return "".join(getattr(c, "text", "") for c in result.content)


async def session_run(read, write, plan, out):
    async with ClientSession(read, write) as session:
        await session.initialize()
        tools = await session.list_tools()
        out["tools"] = [{"name": t.name, "input_schema": t.input_schema} for t in tools.tools]

        async def one(call):
            r = await session.call_tool(call.get("name", "exec_command"), call.get("arguments", {}))
            return {"is_error": bool(r.is_error), "text": content_text(r),
                    "structured": r.structured_content}

        if plan.get("parallel"):
            out["results"] = list(await asyncio.gather(*(one(c) for c in plan.get("calls", []))))
        else:
            for c in plan.get("calls", []):
                out["results"].append(await one(c))


async def main(plan) -> dict:
    out = {"tools": [], "results": [], "error": None}
    try:
        if plan["transport"] == "stdio":
            s = plan["server"]
            params = StdioServerParameters(command=s["command"], args=s.get("args", []),
                                           env=s.get("env"))
            async with stdio_client(params) as (read, write):
                await session_run(read, write, plan, out)
        else:
            headers = {}
            if plan.get("token"):
                headers["Authorization"] = f"Bearer {plan['token']}"
            async with httpx2.AsyncClient(headers=headers, timeout=120) as http:
                async with streamable_http_client(plan["url"], http_client=http) as (read, write):
                    await session_run(read, write, plan, out)
    except BaseException as e:  # noqa: BLE001 - reported to the Rust test, which asserts on it
        out["error"] = describe(e)
    return out


if __name__ == "__main__":
    plan = json.loads(sys.argv[1])
    result = asyncio.run(asyncio.wait_for(main(plan), timeout=plan.get("deadline", 120)))
    print(json.dumps(result))
