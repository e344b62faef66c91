"""Child processes the workspace starts (Label Studio, the ML backend, mongod, the FiftyOne App).

Each service binds 127.0.0.1 on a free port, logs to ``ws.logs_dir/<name>.log``, is recorded in
``ws.root/services.json`` with its PID, and is stopped by PID (its whole process group), so Ctrl-C
or a test's teardown leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from workspace.base.config import Workspace
from workspace.base.errors import MammoError


class ServiceError(MammoError):
    """A service that did not start or answer in time (the message names its log file)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= response.status < 400
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


@dataclass
class Service:
    name: str
    pid: int
    port: int
    log_path: Path
    url: str = ""
    process: subprocess.Popen | None = field(default=None, repr=False)

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        try:
            os.kill(self.pid, 0)
            return True
        except OSError:
            return False

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left after ``timeout``."""
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if self.process is not None:
                    if self.process.poll() is not None:
                        return
                elif not self.alive():
                    return
                time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def start_service(ws: Workspace, name: str, command: Sequence[str], *, port: int,
                  env: Mapping[str, str] | None = None, ready: Callable[[], bool] | None = None,
                  timeout: float = 180.0, url: str = "", cwd: str | Path | None = None) -> Service:
    """Start ``command`` in its own process group and wait until ``ready()`` (default: port open)."""
    ws.logs_dir.mkdir(parents=True, exist_ok=True)
    log_path = ws.logs_dir / f"{name}.log"
    full_env = dict(os.environ)
    full_env.update(ws.service_env())
    if env:
        full_env.update(env)
    log = open(log_path, "ab")
    process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=full_env,
                               cwd=str(cwd) if cwd else None, start_new_session=True)
    log.close()
    service = Service(name=name, pid=process.pid, port=port, log_path=log_path, url=url, process=process)
    check = ready or (lambda: port_open("127.0.0.1", port))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServiceError(f"{name} exited with code {process.returncode} while starting; "
                                   f"see {log_path}:\n{service.log_tail()}")
            if check():
                _record(ws, service)
                return service
            time.sleep(0.25)
    except BaseException:  # Ctrl-C while waiting: the child is in its own session and would outlive us
        service.stop()
        raise
    service.stop()
    raise ServiceError(f"{name} did not answer within {timeout:.0f} s; see {log_path}:\n{service.log_tail()}")


def _registry(ws: Workspace) -> Path:
    return ws.root / "services.json"


def _record(ws: Workspace, service: Service) -> None:
    path = _registry(ws)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[service.name] = {"pid": service.pid, "port": service.port, "url": service.url,
                          "log": str(service.log_path)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def recorded_services(ws: Workspace) -> dict[str, Service]:
    """Services a previous ``mammo up`` recorded (alive or not)."""
    path = _registry(ws)
    if not path.exists():
        return {}
    return {name: Service(name=name, pid=v["pid"], port=v["port"], log_path=Path(v["log"]), url=v.get("url", ""))
            for name, v in json.loads(path.read_text()).items()}


def stop_all(services: Sequence[Service]) -> None:
    for service in reversed(list(services)):
        service.stop()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def serve_until_stopped(services: Sequence[Service], banner: str, poll_s: float = 1.0) -> int:
    """Print ``banner``, block until Ctrl-C or ``kill PID`` (0) or until a service dies (1, with its log
    tail), then stop every service (last started first)."""
    print(banner)
    print("Ctrl-C stops everything.", flush=True)
    # Ctrl-C and `kill PID` both stop the children. SIGINT is set too: a process started in the
    # background by a shell (`cmd &`, nohup, some CI runners) begins with SIGINT ignored, and Python then
    # leaves it ignored, so Ctrl-C (or a supervisor's SIGINT) would never reach this loop.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            dead = next((s for s in services if not s.alive()), None)
            if dead is not None:
                print(f"{dead.name} stopped unexpectedly; see {dead.log_path}:\n{dead.log_tail()}")
                return 1
            time.sleep(poll_s)
    except KeyboardInterrupt:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        stop_all(services)
