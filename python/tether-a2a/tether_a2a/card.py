"""The agent card a worker publishes to ``a2a.<agent>.work.card`` (its liveness heartbeat too).

Design decision: the card is validated by parsing it into the SDK's ``AgentCard`` protobuf
(unknown fields refused, so a typo is an error at start, not a silently missing field) and
published as given, normalised through the same ProtoJSON rendering as every event.
"""

from __future__ import annotations

import json
from typing import Any

from a2a.types.a2a_pb2 import AgentCard
from google.protobuf.json_format import MessageToDict, ParseDict, ParseError

from . import __version__


class CardError(ValueError):
    """The --card file is missing or not an A2A 1.0 AgentCard."""


def default_card(agent_id: str) -> dict[str, Any]:
    return {
        "name": agent_id,
        "description": f"A2A agent {agent_id} (a2a-sdk executor run by tether-a2a {__version__})",
        "version": __version__,
        "capabilities": {"streaming": True, "pushNotifications": False},
        "defaultInputModes": ["text/plain"],
        "defaultOutputModes": ["text/plain"],
        # A2A 1.0 requires at least one skill (the SDK warns on a card without).
        "skills": [
            {
                "id": "default",
                "name": agent_id,
                "description": f"whatever {agent_id} does with a message",
                "tags": ["tether"],
            }
        ],
    }


def normalise(card: dict[str, Any]) -> dict[str, Any]:
    try:
        proto = ParseDict(card, AgentCard(), ignore_unknown_fields=False)
    except ParseError as e:
        raise CardError(f"not an A2A 1.0 AgentCard: {e}") from e
    if not proto.name:
        raise CardError("agent card has no name")
    out = MessageToDict(proto, preserving_proto_field_name=False)
    # ProtoJSON omits empty fields; a strict parser (the gateway's a2a-lf AgentCard) requires
    # these. The gateway fills supportedInterfaces in when it serves the card.
    out.setdefault("version", "")
    out.setdefault("supportedInterfaces", [])
    out.setdefault("capabilities", {})
    for skill in out.get("skills", []):
        skill.setdefault("description", "")
        skill.setdefault("tags", [])
    return out


def load_card(path: str | None, agent_id: str) -> dict[str, Any]:
    if path is None:
        return normalise(default_card(agent_id))
    try:
        with open(path, encoding="utf-8") as f:
            card = json.load(f)
    except OSError as e:
        raise CardError(f"cannot read {path}: {e}") from e
    except ValueError as e:
        raise CardError(f"{path} is not JSON: {e}") from e
    if not isinstance(card, dict):
        raise CardError(f"{path}: an agent card is a JSON object")
    return normalise(card)
