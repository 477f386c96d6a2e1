"""Starting and stopping engine servers and the router as child processes of the rollout manager.

Runs in the rollout manager (the process that owns the ``sglang`` backend). Every child gets its own
session (process group) and a log file, so ``stop`` can kill a whole tree and a failed start can
show the end of its log in the error.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

LAUNCH_ENV = "PLUGRL_SGLANG_LAUNCH_COMMAND"
DEFAULT_LAUNCH = (sys.executable, "-m", "sglang.launch_server")
ROUTER_LAUNCH = (sys.executable, "-m", "sglang_router.launch_router")


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS just handed out (bound to 0, then released)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_prefix(command: str | list[str] | None = None) -> list[str]:
    """The program that serves one engine: ``command`` (string or argv), else
    ``$PLUGRL_SGLANG_LAUNCH_COMMAND``, else ``python -m sglang.launch_server``. Tests point it at
    ``python -m plugrl.plugins.backends.sglang.server``; the computed flags are the same."""
    command = command or os.environ.get(LAUNCH_ENV)
    if not command:
        return list(DEFAULT_LAUNCH)
    return shlex.split(command) if isinstance(command, str) else list(command)


def flag_words(values: dict) -> list[str]:
    """``{"mem_fraction_static": 0.7, "enable_x": True, "cuda_graph_bs": [1, 2]}`` ->
    ``--mem-fraction-static 0.7 --enable-x --cuda-graph-bs 1 2`` (False/None are left out)."""
    words: list[str] = []
    for key, value in values.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, (list, tuple)):
            words += [flag, *map(str, value)]
        else:
            words += [flag, str(value)]
    return words


def server_args(*, model_path: str, host: str, port: int, tp_size: int, base_gpu_id: int, seed: int,
                memory_saver: bool, device: str | None, overrides: dict | None = None,
                nccl_port: int | None = None, defaults: dict | None = None) -> dict:
    """ServerArgs fields plugrl computes per engine (slime's ``_compute_server_args``), then the
    user's ``--sglang-*`` overrides for fields plugrl does not own, then ``defaults`` (plugrl's
    choices the user may override, e.g. colocation flags) for fields neither set."""
    values = {"model_path": model_path, "host": host, "port": port, "tp_size": tp_size,
              "base_gpu_id": base_gpu_id, "gpu_id_step": 1, "random_seed": seed, "trust_remote_code": True,
              "skip_server_warmup": True, "enable_memory_saver": memory_saver}
    if nccl_port is not None:
        # SGLang derives it from --port when unset; engines on one host could then collide.
        values["nccl_port"] = nccl_port
    if device:
        values["device"] = device
    for key, value in (overrides or {}).items():
        if key in values:
            raise ValueError(f"--sglang-{key.replace('_', '-')} is computed by plugrl per engine")
        values[key] = value
    for key, value in (defaults or {}).items():
        values.setdefault(key, value)
    return values


@dataclass
class Child:
    """One started process and its log."""

    name: str
    process: subprocess.Popen
    log_path: Path
    url: str = ""
    extra: dict = field(default_factory=dict)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)  # the whole session: servers spawn their own children
            except ProcessLookupError:
                return
            try:
                self.process.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue


def start(name: str, argv: list[str], *, log_dir: Path, env: dict | None = None, inherit: bool = True) -> Child:
    """Start ``argv`` with this process's environment plus ``env`` (``inherit=False``: ``env`` only)."""
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:  # the child keeps its own descriptor
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **(env or {})} if inherit else dict(env or {}),
                                   start_new_session=True)
    return Child(name, process, log_path)


def new_log_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="plugrl-sglang-"))


def router_argv(*, host: str, port: int, settings: dict, request_timeout_secs: int, prometheus_port: int) -> list[str]:
    """``sglang_router.launch_router`` flags: slime's choices (circuit breaker and health checks off,
    plugrl waits for engines itself), then the ``--router-*`` settings."""
    values = {"host": host, "port": port, "request_timeout_secs": request_timeout_secs,
              "prometheus_port": prometheus_port, "prometheus_host": host,
              "disable_circuit_breaker": True, "disable_health_check": True, **settings}
    return [*ROUTER_LAUNCH, *flag_words(values)]


def wait_until(predicate, *, timeout: float, interval: float, what: str, child: Child | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited with code {child.process.returncode} while waiting for "
                               f"{what}; log {child.log_path}:\n{child.log_tail()}")
        if predicate():
            return
        if time.monotonic() > deadline:
            tail = f"; log {child.log_path}:\n{child.log_tail()}" if child is not None else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{tail}")
        time.sleep(interval)
