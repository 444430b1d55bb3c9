"""A worker replica's secret environment: ``TETHER_ENV_FILE`` (``KEY=VALUE`` lines).

The orchestrator writes a profile's secrets file into the replica's tmpfs secret volume right
after the container starts (never into its environment, where ``docker inspect`` would show
it). The worker loads it into ``os.environ`` at start, so the agent CLIs its executor spawns
inherit it. The file may appear a moment after the process starts: it is waited for, up to a
deadline. Values are never logged.
"""

from __future__ import annotations

import os
import time
from collections.abc import MutableMapping

WAIT_SECONDS = 30.0
_POLL = 0.05


class SecretEnvError(Exception):
    """The file is missing after the deadline, or a line is not ``KEY=VALUE``."""


def parse(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        t = line.lstrip()
        if not t or t.startswith("#"):
            continue
        key, sep, value = t.partition("=")
        if not sep or not key or not (key[0].isalpha() or key[0] == "_") or not all(
            c.isalnum() or c == "_" for c in key
        ):
            # The line number only: the line may hold a secret.
            raise SecretEnvError(f"line {n} is not KEY=VALUE")
        out[key] = value
    return out


def load(
    env: MutableMapping[str, str] | None = None,
    wait: float = WAIT_SECONDS,
) -> list[str]:
    """Loads ``TETHER_ENV_FILE`` (when set) into ``env`` (``os.environ``); the names loaded."""
    env = os.environ if env is None else env
    path = env.get("TETHER_ENV_FILE")
    if not path:
        return []
    deadline = time.monotonic() + wait
    while True:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            break
        except FileNotFoundError:
            if time.monotonic() >= deadline:
                raise SecretEnvError(f"{path} did not appear within {wait:.0f} s") from None
            time.sleep(_POLL)
        except OSError as e:
            raise SecretEnvError(f"cannot read {path}: {e.strerror}") from None
    values = parse(text)
    env.update(values)
    return sorted(values)
