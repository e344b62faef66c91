"""The serve loop `mammo up`, `mammo ls up` and `mammo fiftyone app` block in: it ends on Ctrl-C or
`kill PID` (0) or when a service dies (1), and stops every service it was given, by PID."""

from __future__ import annotations

import os
import signal
import sys
import threading

from workspace.base.services import free_port, serve_until_stopped, start_service


def _two_servers(ws) -> list:
    services = []
    for name in ("first", "second"):
        port = free_port()
        services.append(start_service(ws, name, [sys.executable, "-m", "http.server", str(port), "--bind",
                                                 "127.0.0.1"], port=port, timeout=30))
    return services


def test_a_dead_service_ends_the_loop_and_the_others_are_stopped(ws, capsys):
    first, second = _two_servers(ws)
    threading.Timer(0.5, second.stop).start()
    assert serve_until_stopped([first, second], "serving", poll_s=0.1) == 1
    out = capsys.readouterr().out
    assert "serving" in out and "second stopped unexpectedly" in out
    assert not first.alive() and not second.alive()


def test_kill_pid_stops_everything_like_ctrl_c(ws, capsys):
    services = _two_servers(ws)
    previous = signal.getsignal(signal.SIGTERM)
    threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM)).start()
    assert serve_until_stopped(services, "serving", poll_s=0.1) == 0
    assert "stopped unexpectedly" not in capsys.readouterr().out
    assert not any(s.alive() for s in services)
    assert signal.getsignal(signal.SIGTERM) == previous  # the handler is given back


def test_ctrl_c_stops_a_loop_that_started_with_sigint_ignored(ws, capsys):
    # a process a shell starts in the background (`cmd &`) begins with SIGINT ignored; CI may run us so
    services = _two_servers(ws)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    watchdog = threading.Timer(10, services[0].stop)  # a lost Ctrl-C ends the loop as a death (1), not a hang
    try:
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
        watchdog.start()
        assert serve_until_stopped(services, "serving", poll_s=0.1) == 0
        assert not any(s.alive() for s in services)
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # given back as it was
    finally:
        watchdog.cancel()
        signal.signal(signal.SIGINT, before)
