"""``shadowlens worker --role replay --processes N``: several replay processes on one box.

A replay process works on one core (one onnxruntime thread per session, streams/replay/runner.py, and
one Python thread), so a box with more cores runs more of them. Each is an ordinary member of
the replay consumer group, started with the same config: the mirror partitions are spread over
all replay processes of all boxes, and a process beyond the partition count idles.

This process supervises them. It checks once what each would check at start (every model loads
with its output; the metrics ports are free), so a mistake is one line instead of N; starts N
children (``worker --role replay --replica i/N``; every log line says which), each serving
metrics on ``[metrics] port + i`` (``SHADOWLENS_METRICS__PORT``; port 0: each any free port,
named in its start-up line); forwards SIGTERM and SIGINT to them and exits when they have
stopped. When a child exits on its own, it says which and with what code, stops the others and
exits non-zero (2 when the child's was an operator error, else 1). It does not restart it: a
replay process that dies has a reason (a crash, out of memory) that restarting in a loop would
hide, and the box's supervisor (systemd ``Restart=on-failure``, Kubernetes) restarts the set.
Nothing is lost either way: a replay process commits only what it handed over, so the next
owner of its partitions replays the rest. On Linux the children also die with this process,
even when it is killed (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from streams.config import Settings

log = logging.getLogger("shadowlens.replicas")
STOP_GRACE_S = 60.0  # a replay process stops within seconds (its producer's last acks); then SIGKILL


def replica_ports(settings: Settings, n: int) -> list[int | None]:
    """Each child's metrics port: the configured one + i; 0 stays 0 (any free port); None: metrics off."""
    m = settings.metrics
    if not m.enabled:
        return [None] * n
    return [0 if m.port == 0 else m.port + i for i in range(n)]


def check_ports(settings: Settings, ports: list[int | None]) -> None:
    from streams.doctor.checks import port_free
    from streams.metrics import MetricsAddressUnavailable

    host, n = settings.metrics.host, len(ports)
    for i, port in enumerate(ports):
        if not port:
            continue
        exc = None if port > 65535 else port_free(host, port)
        problem = "beyond 65535" if port > 65535 else exc and (exc.strerror or str(exc))
        if problem:
            raise MetricsAddressUnavailable(
                f"metrics address {host}:{port} (replay process {i + 1} of {n}: [metrics] port + {i}) is not available "
                f"({problem}): set [metrics] port (env SHADOWLENS_METRICS__PORT) to the first of {n} free ports, "
                f"or 0 for any free port each")  # fmt: skip


def run_replicas(config: Path, settings: Settings, n: int, loglevel: str = "info", debug: bool = False) -> int:
    """Start, supervise and stop ``n`` replay processes; returns the exit code. Raises the
    start-up checks' one-line errors (ConfigError, MetricsAddressUnavailable) before starting any."""
    from streams.doctor.checks import startup_checks

    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s [replay supervisor] %(name)s: "
                                                       "%(message)s")  # fmt: skip
    ports = replica_ports(settings, n)
    check_ports(settings, ports)
    startup_checks(settings, "replay")  # the loaded sessions are dropped at once: the children load their own
    if n > settings.kafka.partitions:
        log.warning("%d replay processes, [kafka] partitions = %d: a process beyond the mirror topic's partition "
                    "count has nothing to read", n, settings.kafka.partitions)  # fmt: skip
    if n > (os.cpu_count() or n):
        log.warning("%d replay processes on %d cores: each uses one; more than the cores only share them", n,
                    os.cpu_count())  # fmt: skip
    cmd = [sys.executable, "-m", "streams.cli", *(["--debug"] if debug else []), "worker", "--config", str(config),
           "--role", "replay", "--loglevel", loglevel]  # fmt: skip
    children: list[subprocess.Popen] = []
    stopping: list[float] = []  # when the stop began (empty: running)

    def stop(reason: str) -> None:
        if not stopping:
            log.info("stopping %d replay processes (%s)", n, reason)
            stopping.append(time.monotonic())
        for p in children:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: stop(signal.Signals(signum).name))
    for i, port in enumerate(ports):
        env = dict(os.environ)
        if port is not None:
            env["SHADOWLENS_METRICS__PORT"] = str(port)
        child = subprocess.Popen([*cmd, "--replica", f"{i + 1}/{n}"], env=env, stdin=subprocess.DEVNULL,
                                 preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)  # fmt: skip
        children.append(child)
        where = "off" if port is None else "any free port (its start-up line names it)" if port == 0 else \
            f"http://{settings.metrics.host}:{port}/metrics"
        log.info("replay process %d/%d: pid %d, metrics %s", i + 1, n, child.pid, where)
    code, reported = 0, set()
    while len(reported) < n:
        for i, p in enumerate(children):
            if p.poll() is None or i in reported:
                continue
            reported.add(i)
            if not stopping:
                log.error("replay process %d/%d (pid %d) exited with code %s; stopping the others (restart the set: "
                          "nothing is lost, the uncommitted records are replayed)", i + 1, n, p.pid, p.returncode)
                code = 2 if p.returncode == 2 else 1
                stop(f"process {i + 1} exited")
        if stopping and time.monotonic() - stopping[0] > STOP_GRACE_S:
            for p in children:
                if p.poll() is None:
                    log.error("replay process pid %d did not stop within %.0f s: killed", p.pid, STOP_GRACE_S)
                    p.kill()
        time.sleep(0.2)
    log.info("replay processes stopped")
    return code


def _die_with_parent() -> None:
    """In each child before it runs: SIGTERM when the supervisor dies, even by SIGKILL, so no
    replay process is left running unsupervised."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
