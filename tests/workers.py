"""Run a Python script as a cluster of local `tf.distribute` workers.

Each worker is a fresh interpreter on 127.0.0.1 with its own `TF_CONFIG`
(free ports, found by binding port 0), one CPU device and its output in a
log file. Every worker runs in its own process group, and every group is
killed when `Cluster` closes: on success, on failure, on a timeout and on
a test's own assertion error. Nothing outlives the test.

Example:

```python
with workers.Cluster(tmp_path, n=2) as cluster:
    results = cluster.run(SCRIPT, args=[str(tmp_path)], timeout=120)
assert all(r.returncode == 0 for r in results)
```
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time


def free_ports(n):
    """`n` distinct free TCP ports on 127.0.0.1.

    The sockets stay bound until all `n` are found, so the ports differ.
    """
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(ports, index):
    """The `TF_CONFIG` of worker `index` of a cluster on `ports`."""
    workers = [f"127.0.0.1:{port}" for port in ports]
    return json.dumps(
        {
            "cluster": {"worker": workers},
            "task": {"type": "worker", "index": index},
        }
    )


def base_env():
    """The environment of a worker: CPU only, quiet, few threads."""
    env = dict(os.environ)
    env.update(
        CUDA_VISIBLE_DEVICES="",
        TF_CPP_MIN_LOG_LEVEL="3",
        KERAS_BACKEND="tensorflow",
        TF_NUM_INTEROP_THREADS="2",
        TF_NUM_INTRAOP_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("TF_CONFIG", None)
    return env


class Result:
    """A finished worker: `index`, `returncode` and its `log` text."""

    def __init__(self, index, returncode, log):
        self.index = index
        self.returncode = returncode
        self.log = log

    def __repr__(self):
        return f"Result(index={self.index}, returncode={self.returncode})"


class Cluster:
    """`n` local workers sharing one `TF_CONFIG` cluster.

    Args:
        directory: where the logs go (`worker_<i>.log`).
        n: the number of workers.

    The ports are chosen once, so a cluster started again (`start` after a
    kill) is the same cluster, as a user restarting the same commands.
    """

    def __init__(self, directory, n=2):
        self.directory = str(directory)
        self.n = n
        self.ports = free_ports(n)
        self.processes = {}
        self.logs = {}
        self.starts = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill_all()
        return False

    def start(self, command, index, env=None):
        """Start worker `index` running `command` (a list of arguments).

        Returns:
            The `subprocess.Popen` of the worker.
        """
        self.kill(index)
        worker_env = base_env()
        worker_env["TF_CONFIG"] = tf_config(self.ports, index)
        worker_env.update(env or {})
        self.starts += 1
        path = os.path.join(
            self.directory, f"worker_{index}.{self.starts}.log"
        )
        log = open(path, "w")
        try:
            process = subprocess.Popen(
                command,
                env=worker_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        self.processes[index] = process
        self.logs[index] = path
        return process

    def start_all(self, command, env=None):
        """Start every worker running the same `command`."""
        for index in range(self.n):
            self.start(command, index, env=env)

    def run(self, script, args=(), timeout=180, env=None):
        """Run a Python `script` (source text) on every worker and wait.

        Returns:
            A list of `Result`, one per worker.
        """
        self.start_all([sys.executable, "-c", script, *args], env=env)
        return self.wait(timeout)

    def wait(self, timeout):
        """Wait for every worker; a failed worker stops the others.

        A worker that fails leaves the others blocked in a collective, so
        they are killed at once (their result then reads as killed).

        Raises:
            TimeoutError: when a worker is still running after `timeout`
                seconds (every worker is then killed, the logs quoted).
        """
        deadline = time.monotonic() + timeout
        while True:
            codes = {i: p.poll() for i, p in self.processes.items()}
            if any(code not in (None, 0) for code in codes.values()):
                self.kill_all()
                break
            if all(code is not None for code in codes.values()):
                break
            if time.monotonic() > deadline:
                self.kill_all()
                raise TimeoutError(
                    f"Workers still running after {timeout}s.\n"
                    + self.describe()
                )
            time.sleep(0.1)
        return [
            Result(i, p.returncode, self.read_log(i))
            for i, p in sorted(self.processes.items())
        ]

    def wait_for_file(self, path, timeout):
        """Wait until `path` exists (a worker's progress marker).

        Raises:
            TimeoutError: when it does not appear in time, or every worker
                exited first.
        """
        deadline = time.monotonic() + timeout
        while not os.path.exists(path):
            if all(p.poll() is not None for p in self.processes.values()):
                raise TimeoutError(
                    f"Workers exited before {path} appeared.\n"
                    + self.describe()
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{path} did not appear in {timeout}s.\n"
                    + self.describe()
                )
            time.sleep(0.05)

    def kill(self, index):
        """SIGKILL worker `index`'s process group and reap it."""
        process = self.processes.get(index)
        if process is None:
            return
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def kill_all(self):
        for index in list(self.processes):
            self.kill(index)

    def read_log(self, index):
        path = self.logs.get(index)
        if path is None or not os.path.exists(path):
            return ""
        with open(path, errors="replace") as f:
            return f.read()

    def describe(self, tail=3000):
        """The last lines of every worker's log, for an error message."""
        parts = []
        for index, process in sorted(self.processes.items()):
            parts.append(
                f"--- worker {index} (returncode {process.poll()}) ---\n"
                + self.read_log(index)[-tail:]
            )
        return "\n".join(parts)
