"""Run the whole test suite once per Keras backend.

    python tests/run_backends.py [--backends B,...] [--jobs N] [PYTEST_ARGS]

Each backend gets its own `python -m pytest` process with `KERAS_BACKEND`
set (Keras picks its backend once per process, when it is imported).
`--jobs 2` runs two backends at a time: most of a test's time is
single-threaded Python (tracing, graph building), so two processes share
two cores well. Tests marked `cross_backend` start every backend in
subprocesses themselves, so they run in the first backend's pass only. A
backend whose package is not installed fails the run (install it, or
leave it out with `--backends`).

Each pass's output is printed whole when it ends (passes do not
interleave), then one line per backend: result, counts, seconds. Exits
non-zero when any pass fails.
"""

import argparse
import concurrent.futures
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

BACKENDS = ("tensorflow", "jax", "torch")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def parse(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="python tests/run_backends.py [--backends B,...] [--jobs N] "
        "[PYTEST_ARGS...]",
    )
    parser.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help="comma-separated Keras backends (default: all three)",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="backends tested at the same time (default 1)",
    )
    args, pytest_args = parser.parse_known_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for backend in backends:
        if backend not in BACKENDS:
            parser.error(
                f"--backends: unknown backend {backend!r}; expected some of "
                f"{', '.join(BACKENDS)}"
            )
    if args.jobs < 1:
        parser.error(f"--jobs: expected an integer >= 1, got {args.jobs}")
    return backends, args.jobs, pytest_args


def summary(output):
    """The last line pytest printed with its counts (`3 passed in 1s`)."""
    for line in reversed(output.splitlines()):
        if re.search(r"\b(passed|failed|error|errors|skipped)\b", line):
            return line.strip("= ")
    return "no summary"


_PRINT = threading.Lock()


def run_pass(backend, first, pytest_args):
    """One pytest process on `backend`; `(returncode, output, seconds)`."""
    command = [sys.executable, "-m", "pytest", *pytest_args]
    if not first:
        command += ["-m", "not cross_backend"]
    env = dict(os.environ, KERAS_BACKEND=backend)
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as log:
        code = subprocess.call(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        log.seek(0)
        output = log.read()
    seconds = time.monotonic() - start
    with _PRINT:
        print(f"== KERAS_BACKEND={backend}: {' '.join(command[1:])}")
        sys.stdout.write(output)
        sys.stdout.flush()
    return code, output, seconds


def main(argv=None):
    backends, jobs, pytest_args = parse(
        sys.argv[1:] if argv is None else argv
    )
    missing = [b for b in backends if importlib.util.find_spec(b) is None]
    if missing:
        print(
            f"run_backends: {', '.join(missing)} not installed; install "
            "them (pip install jax \"torch==2.13.0\") or choose with "
            "--backends",
            file=sys.stderr,
        )
        return 2
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = [
            pool.submit(run_pass, backend, i == 0, pytest_args)
            for i, backend in enumerate(backends)
        ]
        results = [f.result() for f in futures]
    print("\nbackend     result  tests")
    for backend, (code, output, seconds) in zip(backends, results):
        state = "ok" if code == 0 else f"FAIL({code})"
        print(f"{backend:<11} {state:<7} {summary(output)} [{seconds:.0f} s]")
    return 0 if all(code == 0 for code, _, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
