"""jaxmoe across processes, as on several hosts: 2 JAX processes on this machine, 4 CPU devices each.

JAX is multi-controller: every process runs the same program, holds only its own devices' shards and
feeds only its own rows of the batch, and collectives cross processes (here through gloo, JAX's CPU
collectives). tests/multiprocess_worker.py is one such process; it says what it checks (`jaxmoe.moe`
and both MoELayers on (data, expert) meshes over all 8 devices, against one device). This test starts
the processes, and fails with their output if one of them fails, or if they do not finish in time (a
process whose peer died waits in a collective forever).
"""

from __future__ import annotations

import pathlib
import socket
import subprocess
import sys
import time

import pytest

WORKER = pathlib.Path(__file__).with_name("multiprocess_worker.py")
PROCESSES = 2
TIMEOUT_S = 240  # about 30 CPU-seconds of work in all; the rest is headroom for a loaded machine
TAIL_LINES = 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def tail(path: pathlib.Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if not line.startswith("[Gloo]")]
    return "\n".join(lines[-TAIL_LINES:])


@pytest.mark.parametrize("impl", ["xla", "interpret"])
def test_two_processes_match_one_device(impl, tmp_path):
    port = free_port()
    logs = [tmp_path / f"process{i}.log" for i in range(PROCESSES)]
    processes = []
    for i, log in enumerate(logs):
        with open(log, "w") as out:
            processes.append(subprocess.Popen([sys.executable, str(WORKER), str(port), str(i), str(PROCESSES), impl],
                                              stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + TIMEOUT_S
    failure = None
    try:
        while failure is None:
            codes = [p.poll() for p in processes]
            if all(code == 0 for code in codes):
                break
            failed = [f"process {i} exited with {code}" for i, code in enumerate(codes) if code not in (None, 0)]
            if failed:
                failure = ", ".join(failed)
            elif time.monotonic() > deadline:
                failure = f"not done after {TIMEOUT_S} s"
            else:
                time.sleep(0.2)
    finally:  # one failed or time is up: the others would wait for it in a collective
        for p in processes:
            if p.poll() is None:
                p.kill()
        for p in processes:
            p.wait()
    outputs = [tail(log) for log in logs]
    if failure is None:  # exit 0 without having run the checks passes nothing
        failure = ", ".join(f"process {i} did not report 'all ok'" for i, out in enumerate(outputs)
                            if f"[process {i}] all ok" not in out) or None
    if failure:
        pytest.fail(failure + "".join(f"\n\n--- process {i}, last lines:\n{out}" for i, out in enumerate(outputs)),
                    pytrace=False)
