"""An MCP client: the shell-server's `exec_command` tool from the official MCP Python SDK.

The shell-server runs the command in the caller's own space container, chosen by the token:

    export TETHER_TOKEN=$(tether token issue --agent agent-1)
    python3 examples/mcp_client.py 'cd /tmp && pwd'          # stdio: starts `shell-server mcp --stdio`
    python3 examples/mcp_client.py --http http://127.0.0.1:8790/mcp 'id'
"""

import argparse
import asyncio
import os

import httpx2

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client


async def run(session: ClientSession, command: str) -> None:
    await session.initialize()
    tools = await session.list_tools()
    print("tools:", [t.name for t in tools.tools])
    result = await session.call_tool("exec_command", {"command": command})
    for part in result.content:
        print(getattr(part, "text", part))
    print("error" if result.is_error else "ok")


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("command", nargs="?", default="uname -a")
    p.add_argument("--http", help="streamable HTTP URL of the shell-server's MCP listener")
    a = p.parse_args()
    if a.http:
        headers = {"Authorization": f"Bearer {os.environ['TETHER_TOKEN']}"}
        async with httpx2.AsyncClient(headers=headers, timeout=60) as http:
            async with streamable_http_client(a.http, http_client=http) as (read, write):
                async with ClientSession(read, write) as s:
                    await run(s, a.command)
    else:
        # The subprocess reads TETHER_TOKEN and the bus address from the environment, and its
        # own bus credentials (a shell-server's: TETHER_NATS_NKEY_FILE, e.g.
        # ~/.local/share/tether/bus-keys/shell-server.nk from `tether up`).
        server = StdioServerParameters(command="shell-server", args=["mcp", "--stdio"], env=dict(os.environ))
        async with stdio_client(server) as (read, write):
            async with ClientSession(read, write) as s:
                await run(s, a.command)


if __name__ == "__main__":
    asyncio.run(main())
