"""tether-a2a: run an unmodified a2a-sdk ``AgentExecutor`` as a tether A2A worker.

Layout:
  ``worker``    the CLI and the fetch loop (``python -m tether_a2a.worker``)
  ``runner``    one work item: execute, forward events, heartbeats, cancel
  ``gateway``   the worker's requests to the gateway (``a2a.<agent>.work.*``) and their replies
  ``events``    a2a-sdk protobuf events <-> A2A 1.0 ProtoJSON, work-item parsing
  ``queue``     the ``EventQueue`` handed to the executor
  ``token``     the bearer token from ``TETHER_TOKEN`` / ``TETHER_TOKEN_FILE`` (re-read on change)
  ``card``      the agent card (``--card`` or a default one)
  ``examples``  a plain a2a-sdk executor used by the tests

The design decision to know: the executor never sees NATS. It gets the same ``RequestContext``
and an ``EventQueue`` the a2a-sdk server would give it; the worker turns every enqueued event
into one ``a2a.<agent>.work.event`` request, in order, and the gateway owns the task.
"""

__version__ = "0.1.0"
