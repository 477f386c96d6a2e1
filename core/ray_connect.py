"""``--ray-address``: its form checked with the config, the cluster's port probed before the run writes
anything, and ``ray.init`` failures turned into one line naming the flag (Ray itself answers a malformed
address with a traceback and retries an address nobody listens on for minutes)."""

from __future__ import annotations

import re
import socket

FORMS = "host:port (e.g. 10.0.0.1:6379), ray://host:port (Ray client), auto (the cluster this machine joined) or local"
_HOST_PORT = re.compile(r"^(?:ray://)?(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")
PROBE_TIMEOUT_S = 5.0


class ClusterConnectError(RuntimeError):
    """The driver could not join the Ray cluster ``--ray-address`` names; the message says why and what to do."""


def host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of ``host:port`` / ``ray://host:port`` (brackets stripped from an IPv6 host), else None."""
    match = _HOST_PORT.match(address.strip())
    if match is None or not 0 < int(match.group("port")) < 65536:
        return None
    return match.group("host").strip("[]"), int(match.group("port"))


def ray_address_problems(args) -> list[str]:
    """The form of ``--ray-address`` (the values alone: the same on every machine)."""
    address = getattr(args, "ray_address", None)
    if not address or address in ("auto", "local") or host_port(address):
        return []
    return [f"--ray-address {address}: not a Ray address; give {FORMS}, or leave it unset to start a local cluster"]


def ray_reachability_problems(args) -> list[str]:
    """Whether anything listens at ``--ray-address`` (a TCP connect, at most ``PROBE_TIMEOUT_S``), before
    the run writes its directory; ``ray.init`` would retry for minutes."""
    address = getattr(args, "ray_address", None)
    target = host_port(address) if address else None
    if target is None:
        return []
    try:
        with socket.create_connection(target, timeout=PROBE_TIMEOUT_S):
            return []
    except OSError as exc:
        why = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        return [f"--ray-address {address}: nothing answers at {target[0]}:{target[1]} ({why}); start the cluster "
                "there (`ray start --head --port PORT` on the head node), correct the address, or leave it unset "
                "to start a local cluster"]


def join_cluster(address: str, **init_kwargs) -> None:
    """``ray.init(address=...)``, its refusal as ``ClusterConnectError`` naming ``--ray-address``."""
    import ray

    try:
        ray.init(address=address, **init_kwargs)
    except (ConnectionError, ValueError, TimeoutError) as exc:
        raise ClusterConnectError(f"--ray-address {address}: cannot join the Ray cluster ({type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc}); check that "
                                  "the cluster is running and the address is right, or leave it unset to start a "
                                  "local cluster") from exc
