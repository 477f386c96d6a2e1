"""``--rm-type remote_rm``: POST ``{"prompt", "response", "label"}`` to a reward server and return
its JSON body (a number, or a dict for ``--reward-key``). Async, per sample, in the rollout manager.

Options: ``url`` (required, slime's ``--rm-url``); ``timeout`` (total seconds per attempt, default
120); ``max_attempts`` (default 10); ``backoff_scale`` (default 1.0). After a failed attempt it waits
``backoff_scale * (min(2**attempt, 30) + U(0, 1))`` s (attempt counts from 0); the last failure is
raised. Connections are pooled per event loop (64 at most), as in slime.
"""

from __future__ import annotations

import dataclasses

import asyncio
import logging
import random
import threading

from plugrl.core import hookimpl

logger = logging.getLogger(__name__)

MAX_CONNECTIONS = 64

_sessions: dict = {}  # event loop -> aiohttp.ClientSession; a session cannot cross loops
_sessions_lock = threading.Lock()


def _session():
    import aiohttp

    loop = asyncio.get_running_loop()
    with _sessions_lock:
        session = _sessions.get(loop)
        if session is None or session.closed:
            for old_loop in [lp for lp in _sessions if lp.is_closed()]:
                del _sessions[old_loop]  # their sessions died with their loop
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS))
            _sessions[loop] = session
        return session


async def aclose() -> None:
    """Close this event loop's connection pool (``plugrl score`` calls it when done)."""
    with _sessions_lock:
        session = _sessions.pop(asyncio.get_running_loop(), None)
    if session is not None:
        await session.close()


def backoff_seconds(attempt: int, scale: float = 1.0) -> float:
    return scale * (min(2**attempt, 30) + random.random())


async def post_reward(url: str, payload: dict, *, timeout: float = 120.0, max_attempts: int = 10,
                      backoff_scale: float = 1.0):
    import aiohttp

    session = _session()
    for attempt in range(max_attempts):
        try:
            async with session.post(url, json=payload, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                resp.raise_for_status()
                return await resp.json(content_type=None)
        except Exception as exc:
            if attempt + 1 >= max_attempts:
                logger.warning("remote_rm: %s failed after %d attempts: %r", url, attempt + 1, exc)
                raise
            delay = backoff_seconds(attempt, backoff_scale)
            logger.info("remote_rm: %r, retry %d/%d in %.1f s", exc, attempt + 1, max_attempts - 1, delay)
            await asyncio.sleep(delay)


async def remote_rm(sample, *, url=None, timeout=120.0, max_attempts=10, backoff_scale=1.0):
    if not url:
        raise ValueError("remote_rm needs the reward server's URL: --rm-opt url=http://host:port/path")
    payload = {"prompt": sample.prompt, "response": sample.response, "label": sample.label}
    return await post_reward(str(url), payload, timeout=float(timeout), max_attempts=int(max_attempts),
                             backoff_scale=float(backoff_scale))


remote_rm.aclose = aclose


@dataclasses.dataclass
class RemoteRMOptions:
    """``--rm-opt`` options of ``remote_rm`` (``--rm-url URL`` fills ``url``)."""

    url: str | None = dataclasses.field(default=None, metadata={"help": "the reward server's URL"})
    timeout: float = dataclasses.field(default=120.0, metadata={"help": "seconds per request"})
    max_attempts: int = dataclasses.field(default=10, metadata={"help": "tries before a sample scores as failed"})
    backoff_scale: float = dataclasses.field(default=1.0, metadata={"help": "scale of the retry back-off"})


def check_remote_rm_options(options) -> list[str]:
    problems = [] if options.url else ["needs the reward server's URL: --rm-opt url=http://host:port/path"]
    if options.timeout <= 0:
        problems.append(f"option 'timeout' must be > 0, got {options.timeout}")
    if options.max_attempts < 1:
        problems.append(f"option 'max_attempts' must be >= 1, got {options.max_attempts}")
    return problems


@hookimpl
def plugrl_register_rewards(register):
    register("remote_rm", remote_rm, requires=("aiohttp",), options=RemoteRMOptions,
             check_options=check_remote_rm_options,
             description="POSTs prompt/response/label to --rm-opt url=..., returns its JSON")
