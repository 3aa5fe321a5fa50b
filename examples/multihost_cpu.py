"""Run the example trainer as N local processes under jax.distributed (CPU only), like a pod slice.

    python examples/multihost_cpu.py --processes 2 -- --config configs/digits.yaml \\
        --set checkpoint.directory=/tmp/jckpt-digits-mh
    # interrupt it (Ctrl-C, or --kill-after 5 to SIGKILL every process after 5 s), then run it again:
    python examples/multihost_cpu.py --processes 2 -- --config configs/digits.yaml \\
        --set checkpoint.directory=/tmp/jckpt-digits-mh train.steps=600   # "resumed from step N"

Each process gets ``--devices`` fake CPU devices and joins a coordination
service on 127.0.0.1 (``jax.distributed.initialize``); then it runs
``examples/train.py`` unchanged with the arguments after ``--``.  Every
process calls the checkpoint manager with the same steps; each writes its own
shards, process 0 commits (docs/multihost.md).  Output lines are prefixed with
the process index.  On a real cluster, run ``train.py`` on every host after
``jax.distributed.initialize()`` instead (see docs/multihost.md).
"""

from __future__ import annotations

import argparse
import os
import runpy
import signal
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(script: str, args: list[str]) -> None:
    """One process: join the group, then run the trainer as ``__main__``."""
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=os.environ["JCKPT_EXAMPLE_COORDINATOR"],
        num_processes=int(os.environ["JCKPT_EXAMPLE_PROCESSES"]),
        process_id=int(os.environ["JCKPT_EXAMPLE_PROCESS_ID"]),
    )
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python SCRIPT` does (configlib.py)
    runpy.run_path(script, run_name="__main__")


def _pump(index: int, stream) -> None:
    for line in stream:
        sys.stdout.write(f"[p{index}] {line}")
        sys.stdout.flush()


def launch(processes: int, devices: int, script: str, args: list[str], kill_after: float | None) -> int:
    """Starts the group and waits for it; returns the first non-zero exit code (0 if none)."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs, pumps = [], []
    for i in range(processes):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
            JCKPT_EXAMPLE_COORDINATOR=coordinator,
            JCKPT_EXAMPLE_PROCESSES=str(processes),
            JCKPT_EXAMPLE_PROCESS_ID=str(i),
            PYTHONUNBUFFERED="1",
        )
        command = [sys.executable, os.path.abspath(__file__), "--worker", script, "--", *args]
        p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(p)
        pumps.append(threading.Thread(target=_pump, args=(i, p.stdout), daemon=True))
        pumps[-1].start()
    started = time.monotonic()
    try:
        while any(p.poll() is None for p in procs):
            if kill_after is not None and time.monotonic() - started > kill_after:
                print(f"--kill-after {kill_after:g}: SIGKILL to every process (a crash, not a clean stop)")
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        print("interrupted: SIGKILL to every process; run the same command again to resume")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)  # jax.distributed catches SIGTERM; a crash is the point here
        for p in procs:
            p.wait()
        for t in pumps:
            t.join(timeout=5)
    codes = [p.returncode for p in procs]
    print(f"exit codes: {codes}")
    return next((c for c in codes if c), 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2, help="number of local processes (default 2)")
    parser.add_argument("--devices", type=int, default=2, help="fake CPU devices per process (default 2)")
    parser.add_argument(
        "--script", default=os.path.join(HERE, "train.py"), help="trainer to run (default examples/train.py)"
    )
    parser.add_argument("--kill-after", type=float, default=None, help="SIGKILL the group after this many s")
    parser.add_argument("--worker", metavar="SCRIPT", help=argparse.SUPPRESS)
    parser.add_argument("args", nargs="*", help="arguments for the trainer (after --)")
    ns = parser.parse_args()
    if ns.worker:
        worker(ns.worker, ns.args)
        return 0
    return launch(ns.processes, ns.devices, ns.script, ns.args, ns.kill_after)


if __name__ == "__main__":
    sys.exit(main())
