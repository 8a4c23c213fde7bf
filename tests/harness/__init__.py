"""Test harness: a real nats-server (`nats.NatsServer`) and service subprocesses (`procs`)."""

from tests.harness.nats import NatsServer, free_port, nats_server_bin
from tests.harness.procs import PythonProc, await_healthy, wait_healthy

__all__ = ["NatsServer", "PythonProc", "await_healthy", "free_port", "nats_server_bin", "wait_healthy"]
