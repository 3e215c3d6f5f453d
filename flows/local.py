"""A local Prefect setup in one command: a server (SQLite), the ``ditpipe-local`` process work pool, its
worker, and the ``dit-pipeline/default`` deployment from ``prefect.yaml``; and one command to stop it.

    python -m flows.local up          # then: export PREFECT_API_URL=http://127.0.0.1:4200/api
    prefect deployment run 'dit-pipeline/default' --param overrides='["train.steps=2000"]' --watch
    python -m flows.local down

Run it from the repo: the deployment's flow runs execute in this folder. Process ids and logs are kept
in ``.prefect-local/`` (``server.log``, ``worker.log``: the flow runs' stage summaries are there too).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

POOL = "ditpipe-local"
STATE = Path(".prefect-local")


def prefect(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prefect", *args], env=env, capture_output=True, text=True)


def healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
    except OSError:
        return False


def start(name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """A detached ``prefect ARGS`` whose pid and output go to .prefect-local/NAME.{pid,log}."""
    log = open(STATE / f"{name}.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    (STATE / f"{name}.pid").write_text(str(proc.pid))
    return proc


def up(port: int, timeout: float = 180) -> str:
    """Start (or reuse) the server, create the pool, deploy, start the worker; return the API URL."""
    url = f"http://127.0.0.1:{port}/api"
    # prefect.yaml's working directory is "{{ $PWD }}": make it this folder even when a parent process
    # started us elsewhere with cwd= (the variable is inherited, not updated, across such a start).
    env = {**os.environ, "PREFECT_API_URL": url, "PWD": str(Path.cwd())}
    STATE.mkdir(exist_ok=True)
    if not healthy(url):
        server = start("server", ["server", "start", "--host", "127.0.0.1", "--port", str(port)], env)
        deadline = time.time() + timeout
        while not healthy(url):
            if server.poll() is not None or time.time() > deadline:
                sys.exit(f"flows.local: the Prefect server did not start; see {STATE / 'server.log'}")
            time.sleep(0.5)
    for step in (["work-pool", "create", POOL, "--type", "process", "--overwrite"],
                 ["--no-prompt", "deploy", "--name", "default"]):
        proc = prefect(*step, env=env)
        if proc.returncode != 0:
            sys.exit(f"flows.local: prefect {' '.join(step)} failed:\n{proc.stdout}{proc.stderr}")
    if not _alive("worker"):
        start("worker", ["worker", "start", "--pool", POOL], env)
    return url


def _alive(name: str) -> bool:
    pid_file = STATE / f"{name}.pid"
    if not pid_file.exists():
        return False
    try:
        os.kill(int(pid_file.read_text()), 0)
        return True
    except (OSError, ValueError):
        return False


def down(timeout: float = 30) -> list[str]:
    """Stop the worker, then the server (whole process groups); return what was stopped."""
    stopped = []
    for name in ("worker", "server"):
        pid_file = STATE / f"{name}.pid"
        if not _alive(name):
            pid_file.unlink(missing_ok=True)
            continue
        pid = int(pid_file.read_text())
        os.killpg(pid, signal.SIGTERM)
        deadline = time.time() + timeout
        while _alive(name) and time.time() < deadline:
            time.sleep(0.2)
        if _alive(name):
            os.killpg(pid, signal.SIGKILL)
        pid_file.unlink(missing_ok=True)
        stopped.append(name)
    return stopped


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Start or stop a local Prefect server, worker and the ditpipe deployment.")
    p.add_argument("action", choices=("up", "down"))
    p.add_argument("--port", type=int, default=4200, help="server port on 127.0.0.1 (default: 4200)")
    args = p.parse_args(argv)
    if args.action == "up":
        url = up(args.port)
        print(f"Prefect server, worker (pool {POOL}) and deployment dit-pipeline/default are up. In each shell:\n"
              f"  export PREFECT_API_URL={url}\n"
              f"  prefect deployment run 'dit-pipeline/default' --watch\n"
              f"UI: {url.removesuffix('/api')}  logs: {STATE}/worker.log  stop: python -m flows.local down")
    else:
        stopped = down()
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")


if __name__ == "__main__":
    main()
