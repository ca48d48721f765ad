"""``python -m mimkit`` without paying for its imports each time: fork servers for the tests' commands.

Started as a script, it imports mimkit's command modules (torch, torchvision, timm: about 3 s of a
command's start on the development CPU), then reads one JSON request per line from standard input:
``{"argv": [...], "cwd": ..., "out": PATH, "err": PATH, "timeout": SECONDS, "code": TEXT}``. For each
it forks a child that takes the request's folder, output files and arguments and then runs
``mimkit`` exactly as ``python -m mimkit`` does (or, given ``code``, that text as ``python -c`` does),
leaving through the interpreter's own exit (atexit handlers, flushed streams). The server answers
``{"pid": PID}`` once the child exists (a test may kill it) and ``{"rc": CODE}`` with its exit status
(negative: the signal that ended it; ``SIGALRM`` when it overran its timeout). The child is its own
process, so locks, file descriptors, exit codes and everything a command writes behave as in a fresh
interpreter. Imported, the module gives the client, :class:`ForkServers`.
"""

from __future__ import annotations

import importlib
import json
import os
import queue
import runpy
import signal
import subprocess
import sys
import types
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

#: What the commands import; a fork finds them loaded.
PRELOAD = ("mimkit.cli", "mimkit.models", "mimkit.engine", "mimkit.engine.profiler", "mimkit.evaluation.runner",
           "mimkit.evaluation.finetune", "mimkit.evaluation.transfer", "mimkit.evaluation.resources", "mimkit.export",
           "mimkit.viz", "mimkit.data")


def _become(request: dict) -> None:
    """In the forked child: the request's folder, streams, arguments and time limit."""
    os.chdir(request["cwd"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, request["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, request["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    sys.argv = ["-c" if request.get("code") else "mimkit", *request["argv"]]
    if not sys.flags.safe_path:  # as `python -m` / `python -c` have it
        sys.path[0] = "" if request.get("code") else os.getcwd()
    signal.alarm(int(request["timeout"]))


def serve() -> str:
    """Answer requests until standard input closes; in a forked child, return its ``code`` ('' for mimkit)."""
    for name in PRELOAD:
        importlib.import_module(name)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _become(request)
            return request.get("code", "")
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
    raise SystemExit(0)


class ForkedCommand:
    """One command running in a child of a lent server; ``pid`` is the child's. :meth:`wait` returns
    the server to the pool, once."""

    def __init__(self, servers: ForkServers, proc: subprocess.Popen, out: Path, err: Path, timeout: int) -> None:
        self.servers, self.proc, self.out, self.err, self.timeout = servers, proc, out, err, timeout
        self.result: tuple[int, str, str] | None = None
        self.returned = False
        try:
            self.pid = int(self._reply()["pid"])
        except BaseException:
            servers.free.put(proc)
            raise

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server ended (exit {self.proc.wait()})")
        return json.loads(line)

    def wait(self) -> tuple[int, str, str]:
        """Wait for the command: its exit code (``-1`` and a message after a timeout), output, errors."""
        if self.result is None:
            if self.returned:
                raise RuntimeError("the fork server of this command ended before it answered")
            try:
                rc = int(self._reply()["rc"])
            finally:
                self.returned = True
                self.servers.free.put(self.proc)
            # A child that could not take its folder or files never ran the command; its server's
            # standard error says why.
            text = self.err.read_text() if self.err.is_file() else f"the child could not open {self.err}"
            if rc == -signal.SIGALRM:  # a hang is a failure of its command, not of the server
                rc, text = -1, f"timed out after {self.timeout} s: {text}"
            self.result = rc, self.out.read_text() if self.out.is_file() else "", text
        return self.result

    def running(self) -> bool:
        """Whether the child still exists (one its server has not reaped yet counts: it is about to be)."""
        if self.result is not None:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL the command if it still runs."""
        if self.result is not None:
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class ForkServers:
    """``count`` servers, each lent to one command at a time, first free first.

    Every server has one thread for torch (``OMP_NUM_THREADS=1``), so runs that must agree bit for bit
    reduce their floats in the same order whichever server forked them. A child's environment is its
    server's, taken when the servers start: a test cannot change it.
    """

    def __init__(self, count: int) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        self.procs = [subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, env=env) for _ in range(count)]
        self.free: queue.Queue[subprocess.Popen] = queue.Queue()
        for proc in self.procs:
            self.free.put(proc)

    def start(self, argv: list[str], cwd: Path, timeout: int = 120, log: Path | None = None,
              code: str = "") -> ForkedCommand:
        """Start ``python -m mimkit *argv`` (or ``python -c code *argv``) in ``cwd`` on the next free server.

        Its standard output and error go to ``log`` with the suffixes ``.out`` and ``.err`` (default:
        beside ``cwd``, named after it).

        Raises:
            RuntimeError: No server came free within ``timeout`` seconds (a command not waited for
                holds its server).

        """
        log = log or cwd.parent / cwd.name
        out, err = log.with_name(log.name + ".out"), log.with_name(log.name + ".err")
        try:
            proc = self.free.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"no fork server came free in {timeout} s; is a started command never waited for?") \
                from None
        try:
            proc.stdin.write(json.dumps({"argv": argv, "cwd": str(cwd), "out": str(out), "err": str(err),
                                         "timeout": timeout, "code": code}) + "\n")
            proc.stdin.flush()
        except BaseException:
            self.free.put(proc)
            raise
        return ForkedCommand(self, proc, out, err, timeout)

    def run(self, argv: list[str], cwd: Path, timeout: int = 120, log: Path | None = None,
            code: str = "") -> tuple[int, str, str]:
        """:meth:`start`, then wait: exit code, standard output, standard error."""
        return self.start(argv, cwd, timeout, log, code).wait()

    def spawn(self, fn: Callable[..., None], args: tuple, nprocs: int, cwd: Path, timeout: int = 120) -> None:
        """``torch.multiprocessing.spawn(fn, args, nprocs)`` on the servers: ``fn(rank, *args)`` in a process
        forked by each, all at once (ranks meet in collectives), without the interpreters' start. As
        ``spawn`` does, the first rank that fails stops the others.

        ``fn`` must be a module-level function of a test module, ``args`` JSON values.

        Raises:
            AssertionError: A rank that did not exit 0, with its standard error.

        """
        if nprocs > len(self.procs):
            raise ValueError(f"{nprocs} ranks need as many servers; there are {len(self.procs)}")
        module = sys.modules[fn.__module__]
        code = (f"import importlib.util, json, sys\n"
                f"sys.path[:0] = {[str(Path(module.__file__).parent), str(Path(__file__).parent)]!r}\n"
                f"spec = importlib.util.spec_from_file_location({fn.__module__!r}, {module.__file__!r})\n"
                f"module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)\n"
                f"spec.loader.exec_module(module)\n"
                f"module.{fn.__name__}(int(sys.argv[1]), *json.loads(sys.argv[2]))\n")
        ranks: list[ForkedCommand] = []
        try:
            for rank in range(nprocs):
                ranks.append(self.start([str(rank), json.dumps(list(args))], cwd, timeout, cwd / f"rank{rank}", code))
        finally:
            results = _wait_all(ranks)
        failed = [f"rank {rank} exit {rc}: {err}" for rank, (rc, _, err) in enumerate(results) if rc]
        if failed:
            raise AssertionError("\n".join(failed))

    def close(self) -> None:
        for proc in self.procs:
            proc.stdin.close()
            proc.wait(timeout=60)


def _wait_all(commands: list[ForkedCommand]) -> list[tuple[int, str, str]]:
    """Every command's result; once one fails, the others are killed (they would wait for it forever)."""
    with ThreadPoolExecutor(max_workers=max(1, len(commands))) as pool:
        futures = [pool.submit(c.wait) for c in commands]
        for done in as_completed(futures):
            if done.exception() is not None or done.result()[0] != 0:
                for c in commands:
                    c.kill()
    return [c.wait() for c in commands]


if __name__ == "__main__":
    code = serve()
    # Only a forked child gets here: the command itself, as `python -m mimkit` (or `python -c`) runs it.
    if code:
        main = sys.modules["__main__"] = types.ModuleType("__main__")
        exec(compile(code, "<string>", "exec", dont_inherit=True), main.__dict__)
    else:
        runpy.run_module("mimkit", run_name="__main__", alter_sys=True)
