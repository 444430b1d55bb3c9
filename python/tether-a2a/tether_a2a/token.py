"""The worker's bearer token: ``TETHER_TOKEN``, or ``TETHER_TOKEN_FILE`` re-read when it changes.

Design decision: the file is checked (stat) on every use rather than watched, so a rotated
token is picked up by the next work.* request and by nats-py on its next (re)connect, which
calls ``TokenSource.__call__`` (nats-py accepts a callable ``token``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

log = logging.getLogger(__name__)


class TokenError(Exception):
    """No usable token could be read."""


class TokenSource:
    """A token from a literal value or a file; the file is re-read when its mtime/size change."""

    def __init__(self, value: str | None = None, path: str | None = None) -> None:
        self._value = value.strip() if value else None
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._cached: str | None = None
        if self._path is not None:
            self.get()  # fail early on an unreadable file

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TokenSource | None:
        """TETHER_TOKEN_FILE wins over TETHER_TOKEN; None when neither is set (no-auth bus)."""
        env = os.environ if env is None else env
        path = env.get("TETHER_TOKEN_FILE")
        if path:
            return cls(path=path)
        value = env.get("TETHER_TOKEN")
        if value:
            return cls(value=value)
        return None

    def get(self) -> str:
        if self._path is None:
            if not self._value:
                raise TokenError("empty token")
            return self._value
        try:
            st = os.stat(self._path)
        except OSError as e:
            if self._cached:
                log.warning("token file %s unreadable (%s); using the last token read", self._path, e)
                return self._cached
            raise TokenError(f"cannot read token file {self._path}: {e}") from e
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp or self._cached is None:
            try:
                with open(self._path, encoding="utf-8") as f:
                    text = f.read().strip()
            except OSError as e:
                if self._cached:
                    return self._cached
                raise TokenError(f"cannot read token file {self._path}: {e}") from e
            if not text:
                if self._cached:
                    return self._cached
                raise TokenError(f"token file {self._path} is empty")
            if self._cached is not None and text != self._cached:
                log.info("token file %s changed; using the new token", self._path)
            self._cached = text
            self._stamp = stamp
        return self._cached

    def __call__(self) -> str:
        """nats-py calls this on every (re)connect."""
        return self.get()

    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.get()}"}
