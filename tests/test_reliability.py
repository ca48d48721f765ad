"""Bad input through the real command line: exit 2, one line naming the problem, nothing touched.

The cases are the table in ``reliability_cases.py``. Every case runs ``python -m mimkit`` in its own
process and its own copy of a workspace (a finished tiny run, small image folders, a truncated
archive); the workspace is hashed before and after, so a refusal that wrote, moved or deleted
anything fails. The processes are forked from the servers of the ``servers`` fixture, which have
imported mimkit once (``cli_forkserver.py``): that saves the interpreter's start and the imports of
every case (about 3 s each). They run one per core at a time, once per session.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli_forkserver import ForkServers
from reliability_cases import CASES, CLASSES, Case

from mimkit.data.datasets import DEBIAN_FASHION_MNIST
from mimkit.engine import pretrain
from mimkit.engine.checkpoint import list_checkpoints
from mimkit.export import export_checkpoint
from mimkit.models import load_config

pytestmark = [pytest.mark.fmnist, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent


def _images(root: Path, classes: dict[str, tuple[str, ...]], write_image) -> None:
    for split, names in classes.items():
        for k, cls in enumerate(names):
            for i in range(4):
                write_image(root / split / cls / f"{i}.png", value=30 + 150 * k + i, size=(8, 8))


def _make_template(base: Path, tiny_overrides: list[str], write_image) -> Path:
    ws = base / "template"
    pretrain(load_config(None, [f"run_dir={ws / 'run'}", *tiny_overrides, "train.epochs=1",
                                "train.ckpt_every_steps=6"]))
    # A method without a pixel reconstruction, and a released encoder.
    no_decoder = [o for o in tiny_overrides if not o.startswith("method.")]
    pretrain(load_config(None, [f"run_dir={ws / 'dino'}", *no_decoder, "method.name=dino", "method.out_dim=64",
                                "method.hidden_dim=32", "method.bottleneck_dim=16", "train.epochs=1",
                                "method.views=[{count: 2}, {size: 12, scale: [0.1, 0.4], count: 2}]"]))
    export_checkpoint(ws / "run", ws / "export")
    _images(ws / "imgs", {"train": ("a", "b"), "val": ("a", "b")}, write_image)
    _images(ws / "noval", {"train": ("a", "b")}, write_image)
    _images(ws / "oneclass", {"train": ("a",), "val": ("a",)}, write_image)
    _images(ws / "mismatch", {"train": ("a", "b"), "val": ("a", "c")}, write_image)
    for i in range(3):
        write_image(ws / "few" / f"{i}.png", value=60 + i, size=(8, 8))
    (ws / "corrupt").mkdir()
    for i in range(4):
        (ws / "corrupt" / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(40))
    (ws / "broken_ckpt").mkdir()
    (ws / "broken_ckpt" / "model.safetensors").write_bytes(b"not a safetensors file")
    (ws / "broken_ckpt" / "state.pt").write_bytes(b"nor a state")
    trunc = ws / "fmnist_trunc"
    trunc.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz"):
        # A download cut short: the first 2 KiB of the gzip stream.
        (trunc / name).write_bytes((DEBIAN_FASHION_MNIST / name).read_bytes()[:2048])
    assert gzip.decompress((DEBIAN_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes())[:4] == b"\0\0\x08\x01"
    (ws / "bad.yaml").write_text("optim:\n  base_lr: [1e-3\n")
    (ws / "cache_no.yaml").write_text("base: mae_fmnist\ndata:\n  cache: no\n")
    (ws / "afile").write_text("a file where a folder is expected\n")
    return ws


def _digest(root: Path) -> dict[str, str]:
    """Every file and folder below ``root`` with its content hash: any change shows (links are not followed)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = f"link to {os.readlink(path)}"
        else:
            out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


class Unavailable(Exception):
    """A setup this machine cannot make (a read-only mount without the privilege): the case is skipped."""


def _hold_lock(ws: Path, kind: int = fcntl.LOCK_EX):
    """Hold the run as a writer does (or, with ``LOCK_SH``, as a reading command does)."""
    fd = os.open(ws / "run" / ".lock", os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, kind | fcntl.LOCK_NB)
    return lambda: os.close(fd)


def _unwritable(ws: Path, place: str, run: str = "new"):
    """``place`` inside a run folder is a folder that even root cannot write (a sysfs folder)."""
    (ws / run).mkdir(exist_ok=True)
    if (ws / run / place).is_dir():
        shutil.rmtree(ws / run / place)
    (ws / run / place).symlink_to("/sys/kernel")
    return None


def _read_only_run(ws: Path):
    """The finished run on a read-only mount (as on a shared, read-only volume)."""
    run = ws / "run"
    res = subprocess.run(["mount", "--bind", "-o", "ro", str(run), str(run)], capture_output=True, text=True)
    if res.returncode != 0:
        raise Unavailable(f"cannot mount read-only here: {res.stderr.strip()}")
    return lambda: subprocess.run(["umount", str(run)], check=True)


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _results(ws: Path, knn: str, linprobe: str = ""):
    """Result files beside the run's newest checkpoint, as ``mimkit knn`` / ``linprobe`` write them."""
    ckpt = list_checkpoints(ws / "run" / "checkpoints")[-1]
    (ckpt / "knn.json").write_text(knn)
    if linprobe:
        (ckpt / "linprobe.json").write_text(linprobe)


def _held_finetuning(ws: Path):
    """A fine-tuning of the run that another process is writing."""
    folder = ws / "run" / "finetune-fmnist"
    folder.mkdir()
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return lambda: os.close(fd)


def _finetuning_without_top1(ws: Path):
    ckpt = ws / "run" / "finetune-fmnist" / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    for name in ("model.safetensors", "state.pt"):
        (ckpt / name).write_bytes(b"")
    (ckpt / "finetune.json").write_text('{"evaluation": "finetune", "subject": "fine-tune vit_tiny_p4"}')


_GOOD_PROBE = '{"evaluation": "linprobe", "subject": "mae step_00000018", "top1": 71.5}'
_KNN = '{"evaluation": "knn", "subject": "mae step_00000018", "top1_k20": 70.1, "top1_k200": 66.0}'


def _other_run(ws: Path):
    ckpt = list_checkpoints(ws / "run" / "checkpoints")[-1]
    shutil.copytree(ckpt, ws / "other" / ckpt.name)
    return None


def _corrupt_all(ws: Path):
    for ckpt in list_checkpoints(ws / "run" / "checkpoints"):
        (ckpt / "model.safetensors").write_bytes(b"\0" * 64)
    return None


SETUPS = {
    "hold_lock": _hold_lock,
    "hold_read": lambda ws: _hold_lock(ws, fcntl.LOCK_SH),
    "other_run": _other_run,
    "corrupt_all": _corrupt_all,
    "unwritable_checkpoints": lambda ws: _unwritable(ws, "checkpoints"),
    "unwritable_tb": lambda ws: _unwritable(ws, "tb", "run"),
    "read_only_run": _read_only_run,
    "config_not_a_number": lambda ws: _edit(ws / "run" / "config.yaml", "embed_dim: 32", "embed_dim: wide"),
    "config_bad_ratio": lambda ws: _edit(ws / "run" / "config.yaml", "  mask_ratio: 0.75\n", "  mask_ratio: 1.5\n"),
    "export_huge": lambda ws: _edit(ws / "export" / "config.yaml", "embed_dim: 32", "embed_dim: 65536"),
    "export_deep": lambda ws: _edit(ws / "export" / "config.yaml", "depth: 1", "depth: 48"),
    "truncated_knn": lambda ws: _results(ws, _KNN[:40], _GOOD_PROBE),
    "only_truncated": lambda ws: _results(ws, _KNN[:40]),
    "knn_not_a_number": lambda ws: _results(ws, _KNN.replace("70.1", '"high"'), _GOOD_PROBE),
    "corrupt_changes": lambda ws: _write(ws / "run" / "config-changes.jsonl", '{"step": 6, "chan\n'),
    "changes_method_key": lambda ws: _write(ws / "run" / "config-changes.jsonl", '{"step": 6, "changes": '
                                            '{"method.mask_ratio": {"from": 0.75, "to": 0.5}}}\n'),
    "changes_bare_value": lambda ws: _write(ws / "run" / "config-changes.jsonl",
                                            '{"step": 6, "changes": {"train.epochs": 3}}\n'),
    "changes_bad_value": lambda ws: _write(ws / "run" / "config-changes.jsonl",
                                           '{"step": 6, "changes": {"train.epochs": {"from": 1.0, "to": -1}}}\n'),
    "odd_metrics_rows": lambda ws: _write(ws / "run" / "metrics.jsonl", (ws / "run" / "metrics.jsonl").read_text()
                                          + '[1, 2]\nnull\n{"step": "5"}\n'),
    "empty_run_config": lambda ws: _write(ws / "run" / "config.yaml", ""),
    "run_config_wide": lambda ws: _edit(ws / "run" / "config.yaml", "embed_dim: 32", "embed_dim: 4096"),
    "held_finetuning": _held_finetuning,
    "export_with_notes": lambda ws: _write(ws / "export" / "notes.txt", "mine\n"),
    "config_not_utf8": lambda ws: (ws / "run" / "config.yaml").write_bytes(b"seed: 0\n\xff\xfe\n") and None,
    "changes_not_utf8": lambda ws: (ws / "run" / "config-changes.jsonl").write_bytes(b"\xff\xfe\n") and None,
    "config_heads_do_not_divide": lambda ws: _edit(ws / "run" / "config.yaml", "num_heads: 2", "num_heads: 3"),
    "good_knn": lambda ws: _results(ws, _KNN),
    "png_named_notes": lambda ws: _write(ws / "notes.png", "my notes, not a picture\n"),
    "finetuning_without_top1": _finetuning_without_top1,
}


@dataclass
class Outcome:
    rc: int
    out: str
    err: str
    before: dict[str, str]
    after: dict[str, str]
    ws: Path
    skipped: str = ""


def _run_case(case: Case, template: Path, base: Path, servers: ForkServers) -> Outcome:
    ws = base / case.id
    shutil.copytree(template, ws, symlinks=True)
    try:
        release = SETUPS[case.setup](ws) if case.setup else None
    except Unavailable as why:
        return Outcome(0, "", "", {}, {}, ws, skipped=str(why))
    except Exception as err:  # a broken setup fails its own case, not the whole table
        return Outcome(-1, "", f"setup {case.setup} failed: {err!r}", {}, {}, ws)
    before = _digest(ws)
    fill = {"ws": str(ws), "run": str(ws / "run"), "ckpt": str(list_checkpoints(ws / "run" / "checkpoints")[-1])}
    argv = [a.format(**fill) for a in case.argv]
    try:
        rc, out, err = servers.run(argv, ws, timeout=120)
    finally:
        if release:
            release()
    return Outcome(rc, out, err, before, _digest(ws), ws)


@pytest.fixture(scope="session")
def outcomes(tmp_path_factory, write_image_session, servers) -> dict[str, Outcome]:
    from conftest import TINY_RUN_OVERRIDES

    base = tmp_path_factory.mktemp("reliability")
    template = _make_template(base, list(TINY_RUN_OVERRIDES), write_image_session)
    with ThreadPoolExecutor(max_workers=min(len(servers.procs), os.cpu_count() or 1)) as pool:
        futures = {c.id: pool.submit(_run_case, c, template, base, servers) for c in CASES}
    return {k: f.result() for k, f in futures.items()}


@pytest.mark.parametrize("argv", [["config", "train.epochs=3"], ["knn", "no-such-run"]])
def test_forked_command_is_the_command(argv: list[str], servers: ForkServers, tmp_path: Path):
    """What the fork server gives is what ``python -m mimkit`` gives: exit code, output, errors."""
    (tmp_path / "ws").mkdir()
    real = subprocess.run([sys.executable, "-m", "mimkit", *argv], capture_output=True, text=True, cwd=tmp_path / "ws",
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert servers.run(argv, tmp_path / "ws", timeout=120) == (real.returncode, real.stdout, real.stderr)


def test_case_ids_are_unique_and_classified():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert {c.klass for c in CASES} == set(CLASSES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, outcomes: dict[str, Outcome]):
    got = outcomes[case.id]
    if got.skipped:
        pytest.skip(got.skipped)
    assert "Traceback" not in got.err, got.err
    if case.rc == 0:
        assert got.rc == 0, got.err
        assert re.search(case.expect, got.out), got.out
        return
    lines = [line for line in got.err.splitlines() if "error:" in line]
    assert got.rc == 2, f"exit {got.rc}\n{got.err}"
    assert len(lines) == 1, got.err
    assert lines[0].startswith(f"mimkit {case.argv[0]}: error: ") or lines[0].startswith("mimkit "), lines[0]
    assert re.search(case.expect, lines[0]), lines[0]
    changed = sorted(k for k in set(got.before) | set(got.after) if got.before.get(k) != got.after.get(k))
    if case.writes:  # the stopped run's own new files, and nothing else
        changed = [k for k in changed if k in got.before]
    assert not changed, f"the refused command changed {changed}"


def test_reliability_md_lists_every_case():
    """RELIABILITY.md states the table; it must name every case and count them right."""
    text = (ROOT / "RELIABILITY.md").read_text()
    missing = [c.id for c in CASES if f"`{c.id}`" not in text]
    assert not missing, f"RELIABILITY.md does not list {missing}"
    listed = set(re.findall(r"^\| `([\w-]+)` \|", text, re.M))
    extra = listed - {c.id for c in CASES} - set(re.findall(r"^\| `([\w-]+)` \|.*\| test: ", text, re.M))
    assert not extra, f"RELIABILITY.md lists cases the table does not have: {sorted(extra)}"
