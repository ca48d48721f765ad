"""``python -m mimkit`` without paying for its imports each time: a fork server for the reliability table.

Started as a script, it imports mimkit's command modules (torch, torchvision, timm: about 3 s of a
command's start on the development CPU), then reads one JSON request per line from standard input:
``{"argv": [...], "cwd": ..., "out": PATH, "err": PATH, "timeout": SECONDS}``. For each it forks a
child that takes the request's folder, output files and arguments and then runs ``mimkit`` exactly
as ``python -m mimkit`` does, leaving through the interpreter's own exit (atexit handlers, flushed
streams). The server answers ``{"rc": CODE}`` with the child's exit status (negative: the signal
that ended it; ``SIGALRM`` when it overran its timeout). The child is its own process, so locks,
file descriptors, exit codes and everything a command writes behave as in a fresh interpreter.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import signal
import sys

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
    sys.argv = ["mimkit", *request["argv"]]
    sys.path[0] = os.getcwd()  # as `python -m` has it
    signal.alarm(int(request["timeout"]))


def serve() -> None:
    """Answer requests until standard input closes; in a forked child, return to run the command."""
    for name in PRELOAD:
        importlib.import_module(name)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _become(request)
            return
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
    raise SystemExit(0)


if __name__ == "__main__":
    serve()
    # Only a forked child gets here: the command itself, as `python -m mimkit` runs it.
    runpy.run_module("mimkit", run_name="__main__", alter_sys=True)
