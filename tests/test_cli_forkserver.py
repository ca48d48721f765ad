"""The fork servers the command-line tests run on: what they give is what a fresh interpreter gives."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_forkserver import ForkServers

_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def test_forked_code_is_python_c(servers: ForkServers, tmp_path: Path):
    code = "import os, sys\nprint(sys.argv, sys.path[0] == '', os.getcwd())\nprint('err', file=sys.stderr)\nsys.exit(3)"
    real = subprocess.run([sys.executable, "-c", code, "a", "b c"], capture_output=True, text=True, cwd=tmp_path,
                          env=_ENV)
    assert real.returncode == 3
    assert servers.run(["a", "b c"], tmp_path, code=code) == (real.returncode, real.stdout, real.stderr)


def test_a_started_command_can_be_killed(servers: ForkServers, tmp_path: Path):
    started = servers.start([], tmp_path, code="import time\ntime.sleep(60)")
    time.sleep(0.2)
    assert started.running()
    os.kill(started.pid, signal.SIGKILL)
    assert started.wait()[0] == -signal.SIGKILL
    assert not started.running()


def test_a_timeout_is_a_failure_of_its_command(servers: ForkServers, tmp_path: Path):
    rc, _, err = servers.run([], tmp_path, timeout=1, code="import time\ntime.sleep(60)")
    assert rc == -1 and err.startswith("timed out after 1 s")
    assert servers.run([], tmp_path, code="print('next')")[:2] == (0, "next\n")  # the server still serves


def test_forked_code_runs_as_main(servers: ForkServers, tmp_path: Path):
    """Code runs in a module ``__main__`` of its own (what pickling a function defined there needs),
    without the server's ``from __future__`` imports (which would turn the annotation into a string)."""
    code = ("import sys\ndef f(x: int): pass\n"
            "print(sys.modules['__main__'].f is f, hasattr(sys.modules['__main__'], '__file__'), f.__annotations__)")
    real = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=_ENV)
    assert real.returncode == 0 and real.stdout.startswith("True False"), real.stderr
    assert servers.run([], tmp_path, code=code) == (real.returncode, real.stdout, real.stderr)


def _rank_meets(rank: int, out: str, fail_rank: int) -> None:
    """Write this rank's pid, then wait for the other rank's: ranks run one after the other never meet."""
    if rank == fail_rank:
        raise RuntimeError(f"rank {rank} fails on purpose")
    Path(out, f"rank{rank}.txt").write_text(str(os.getpid()))
    deadline = time.monotonic() + 30
    while not Path(out, f"rank{1 - rank}.txt").is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank} never met rank {1 - rank}")
        time.sleep(0.01)


def test_spawn_runs_every_rank_at_once_in_its_own_process(servers: ForkServers, tmp_path: Path):
    servers.spawn(_rank_meets, (str(tmp_path), -1), 2, tmp_path)
    pids = {(tmp_path / f"rank{r}.txt").read_text() for r in range(2)}
    assert len(pids) == 2 and str(os.getpid()) not in pids


def test_spawn_reports_a_failing_rank_and_stops_the_others(servers: ForkServers, tmp_path: Path):
    start = time.monotonic()
    with pytest.raises(AssertionError, match="(?s)rank 1 exit 1: .*rank 1 fails on purpose"):
        servers.spawn(_rank_meets, (str(tmp_path), 1), 2, tmp_path)
    assert (tmp_path / "rank0.txt").is_file()
    assert time.monotonic() - start < 20, "rank 0 waited for the failed rank instead of being stopped"
