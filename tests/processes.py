"""Launching one command as several JAX processes on this machine, for the multi-process tests: a free port on
127.0.0.1 for the coordinator, one subprocess per process id with the launch flags appended, every one bounded by
`timeout -s KILL`, so that a hang fails the test instead of stalling the suite."""

import os
import re
import socket
import subprocess
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], num_processes: int, timeout: int, env: dict | None = None) -> list[tuple[int, str, str]]:
    """Run argv + --coordinator-address 127.0.0.1:PORT --num-processes N --process-id i for i < N, all at once, in
    the repository root; returns (exit code, stdout, stderr) by process id (exit code 137: killed at the timeout)."""
    address = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory() as logs:
        procs = []
        for i in range(num_processes):
            flags = ["--coordinator-address", address, "--num-processes", str(num_processes), "--process-id", str(i)]
            out, err = open(os.path.join(logs, f"{i}.out"), "w+"), open(os.path.join(logs, f"{i}.err"), "w+")
            command = ["timeout", "-s", "KILL", str(timeout), *argv, *flags]
            procs.append((subprocess.Popen(command, stdout=out, stderr=err, text=True, cwd=ROOT, env=env), out, err))
        results = []
        for proc, out, err in procs:
            code = proc.wait()
            out.seek(0)
            err.seek(0)
            results.append((code, out.read(), err.read()))
            out.close()
            err.close()
    return results


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute", "send", "recv")


def collectives(compiled_hlo: str) -> list[str]:
    """The cross-device operations of a compiled program's HLO text, as 'shape op' (e.g. 'f32[8]{0} all-gather')."""
    found = [re.search(r"= (\S+) ([a-z-]+)\(", line) for line in compiled_hlo.splitlines()]
    return [" ".join(m.groups()) for m in found if m and m.group(2) in COLLECTIVES]
