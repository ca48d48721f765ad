"""``mimkit`` command line: pretrain, finetune, config, knn, linprobe, report, profile, visualize, export,
resources.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import NoReturn

from mimkit.config import PRECISIONS, ConfigError, resolve_config_path, to_yaml
from mimkit.errors import MimkitError

log = logging.getLogger("mimkit")
_SETTING = re.compile(r"^[A-Za-z_]\w*(\.\w+)*=")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, like every other mimkit error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: type, low: float, inclusive: bool = True, what: str | None = None, high: float | None = None):
    """An argparse type: a ``kind`` number >= ``low`` (> ``low`` unless ``inclusive``), at most ``high``."""

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            noun = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        below = value < low if inclusive else value <= low
        if value != value or value in (float("inf"), float("-inf")) or below or (high is not None and value > high):
            rule = what or (f">= {low}" if inclusive else f"> {low}")
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


class _Renamed(argparse.Action):
    """An option's earlier name: refused in one line that gives the name replacing it."""

    def __init__(self, option_strings: list[str], dest: str, new: str, **kwargs: object) -> None:
        super().__init__(option_strings, argparse.SUPPRESS, nargs="?", default=argparse.SUPPRESS,
                         help=argparse.SUPPRESS)
        self.new = new

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string} is now {self.new}")


POSITIVE_INT = _number(int, 1, what="a positive integer")
POSITIVE_FLOAT = _number(float, 0.0, inclusive=False, what="positive")


def _split_args(items: list[str]) -> tuple[str | None, list[str]]:
    """Separate the optional run path from ``key=value`` overrides."""
    overrides = [a for a in items if "=" in a]
    runs = [a for a in items if "=" not in a]
    if len(runs) > 1:
        raise ConfigError(f"expected at most one run or checkpoint, got {runs}")
    return (runs[0] if runs else None), overrides


def _eval_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("args", nargs="*", metavar="RUN|key=value",
                   help="a run folder or checkpoint, and data.* overrides (e.g. data.img_size=32), in any order")
    p.add_argument("--baseline", choices=["pixels", "random"], help="evaluate a built-in baseline instead")
    p.add_argument("--config", help="config for a baseline without a run (path or packaged name)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--eval-config", default="default",
                   help="evaluation protocol: configs/eval/NAME.yaml or a path; the flags below override it")
    p.add_argument("--batch-size", type=POSITIVE_INT, help="images per feature-extraction pass (config: 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-fraction", type=_number(float, 0.0, inclusive=False, what="in (0, 1]", high=1.0),
                   help="per-class fraction in (0, 1] of the labelled train split to use (kNN bank / probe "
                   "training set; config: 1)")
    p.add_argument("--blocks", type=POSITIVE_INT,
                   help="concatenate the pooled outputs of the last N blocks (config: 1, the final features)")
    p.add_argument("--no-progress", action="store_true")
    return p


def build_parser() -> argparse.ArgumentParser:
    """The one parser for every command."""
    parser = _Parser(prog="mimkit", description="Masked image modeling pre-training and evaluation.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("pretrain", help="pre-train a method", description="Pre-train a method. "
                       "Settings: defaults, then --config, then key=value overrides (dotted keys).")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.base_lr=1e-3 method.mask_ratio=0.6")
    p.add_argument("--config", help="YAML file or packaged config name (e.g. mae_fmnist)")
    p.add_argument("--resume", help="'auto' (newest usable checkpoint in the run folder) or a checkpoint path")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in run_dir (its checkpoints, logs and config are deleted)")

    p = sub.add_parser("finetune", help="fine-tune a run's encoder (or the backbone from scratch) and score it",
                       description="Fine-tune a pre-training run's encoder with a linear head (layer-wise lr "
                       "decay, label smoothing, optional Mixup/CutMix, partial fine-tuning with "
                       "method.trainable_blocks=K), then report top-1 on the test split. Settings: the run's "
                       "config, then --finetune-config, then key=value overrides.")
    p.add_argument("run", nargs="?", help="pre-training run folder or checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=5 method.layer_decay=0.65")
    p.add_argument("--finetune-config", default="fmnist",
                   help="fine-tuning config: configs/finetune/NAME.yaml or a path")
    p.add_argument("--scratch", action="store_true", help="random initialisation: the supervised baseline")
    p.add_argument("--config", dest="arch", help="with --scratch and no run: the pre-training config (name or path) "
                   "naming backbone and data")
    p.add_argument("--arch", action=_Renamed, new="--config")
    p.add_argument("--resume", help="'auto' or a checkpoint path, as for pretrain")
    p.add_argument("--overwrite", action="store_true", help="replace a fine-tuning run already there")

    p = sub.add_parser("config", help="print the resolved config", description="Print the resolved config as YAML.")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--config")

    p = _eval_parser(sub, "knn", "Weighted cosine kNN (DINO's protocol) on frozen features.")
    p.add_argument("--k", type=POSITIVE_INT, nargs="+", help="neighbour counts (config: 20 200)")
    p.add_argument("--temperature", type=POSITIVE_FLOAT, help="config: 0.07")

    p = _eval_parser(sub, "linprobe", "Linear probe (BatchNorm without affine + linear) on frozen cached features.")
    p.add_argument("--epochs", type=POSITIVE_INT, help="config: 100")
    p.add_argument("--lr", type=POSITIVE_FLOAT, help="config: 0.1")
    p.add_argument("--probe-batch-size", type=_number(int, 2, what="at least 2 (BatchNorm)"), help="config: 1024")

    p = sub.add_parser("report", help="table of a run's kNN / linear-probe results beside its baselines",
                       description="Print the kNN and linear-probe results of a run and its baselines as a table.")
    p.add_argument("run", help="run folder")

    p = sub.add_parser("profile", help="where a training step spends its time",
                       description="Profile a few training steps (torch.profiler): data, forward, backward, "
                       "optimizer, and the most expensive operators.")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--config")
    p.add_argument("--steps", type=POSITIVE_INT, default=5)
    p.add_argument("--top", type=POSITIVE_INT, default=15, help="operators to list")
    p.add_argument("--shapes", action="store_true", help="list each operator once per set of input shapes")

    p = sub.add_parser("visualize", help="reconstruction grid (or the views a method sees) and loss curve PNGs",
                       description="Write reconstructions (original, masked, reconstruction, pasted) "
                       "and the loss curve. A method without a pixel reconstruction (DINO, iBOT) gets the "
                       "augmented views its encoder trains on instead (views.png).")
    p.add_argument("run", help="run folder or checkpoint")
    p.add_argument("--num", type=POSITIVE_INT, default=8, help="images in the grid")
    p.add_argument("--split", default="test", choices=["train", "test"], help="images to draw (default: test)")
    p.add_argument("--out", help="PNG path (default: reconstructions.png in the run folder, or views.png for a "
                   "method without a pixel reconstruction)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attention", action="store_true",
                   help="also draw the encoder's last-block attention (attention.png) and a PCA of its patch "
                        "features (pca.png), beside the figure")

    p = sub.add_parser("export", help="release an encoder: safetensors + config, loadable by mimkit.load_encoder",
                       description="Write a run's encoder (safetensors and encoder.json), its whole model and "
                       "config (a checkpoint every command reads), and for ViT backbones timm-keyed weights.")
    p.add_argument("run", help="run folder or checkpoint")
    p.add_argument("--out", required=True, help="export folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace an export folder that holds files")

    p = sub.add_parser("transfer", help="kNN, linear probe (and fine-tuning) of one checkpoint on several datasets",
                       description="Evaluate a run's encoder on each dataset: kNN and the linear probe on frozen "
                       "features, and with --finetune a fine-tuning run, printed as one table and saved as JSON "
                       "beside the checkpoint. data.* settings apply to every dataset; other key=value settings "
                       "are the fine-tuning runs'.")
    p.add_argument("run", help="run folder or checkpoint")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.img_size=32 train.epochs=5")
    p.add_argument("--datasets", nargs="+", required=True, metavar="NAME[:key=value,...]",
                   help="e.g. fashion_mnist cifar10:img_size=32 imagefolder:root=/data/pets,img_size=64")
    p.add_argument("--finetune", action="store_true", help="also fine-tune on each dataset")
    p.add_argument("--finetune-config", default="fmnist", help="fine-tuning config: name or path")
    p.add_argument("--eval-config", default="default", help="evaluation protocol: configs/eval/NAME.yaml or a path")
    p.add_argument("--k", type=POSITIVE_INT, nargs="+", help="kNN neighbour counts (config: 20 200)")
    p.add_argument("--train-fraction", type=_number(float, 0.0, inclusive=False, what="in (0, 1]", high=1.0),
                   help="per-class fraction of each train split as kNN bank / probe training set (config: 1)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--batch-size", type=POSITIVE_INT, help="images per feature-extraction pass (config: 512)")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("resources", help="parameters, FLOPs, peak memory and images/s of configs",
                       description="Measure each config in its own process on synthetic batches: encoder and "
                       "total parameters, training and encoder FLOPs per image, peak memory (CPU resident set, "
                       "CUDA max allocated), training and inference images/s. CONFIG@BACKBONE swaps in that "
                       "backbone's preset; key=value settings apply to every config.")
    p.add_argument("configs", nargs="+", metavar="CONFIG[@BACKBONE]", help="e.g. mae_fmnist cvt_mae_fmnist_s4")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.channels=3")
    p.add_argument("--img-size", type=POSITIVE_INT, default=0, help="input side (default: each config's own)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=64, help="images per measured step")
    p.add_argument("--batch", action=_Renamed, new="--batch-size")
    p.add_argument("--steps", type=POSITIVE_INT, default=5, help="timed steps after two warm-up steps (median)")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--threads", type=_number(int, 0), default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--breakdown", type=_number(int, 0), default=0, metavar="DEPTH",
                   help="also the forward FLOPs of each module down to DEPTH parts of its name below the method "
                        "(3: encoder.stages.0, decoder.ups.1; 0: not)")
    p.add_argument("--out", help="also write the rows as JSON here")
    for p in sub.choices.values():
        p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    parser.commands = dict(sub.choices)
    return parser


#: Where each command collects ``key=value`` settings; commands not listed take none.
_SETTINGS_DEST = {"pretrain": "overrides", "finetune": "overrides", "config": "overrides", "profile": "overrides",
                  "knn": "args", "linprobe": "args", "resources": "overrides", "transfer": "overrides"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse a command line in which options and ``key=value`` settings may come in any order.

    argparse alone stops a positional list at the first option, and lets ``--k 10 20`` swallow a
    setting that follows it; settings are therefore taken out first (unless they are the value of
    an option that takes one) and handed to the command's settings list.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    at = next((i for i, a in enumerate(argv) if a in parser.commands), None)
    if at is None or any(a not in ("-v", "--verbose") for a in argv[:at]):
        return parser.parse_args(argv)
    command, sub = argv[at], parser.commands[argv[at]]
    settings, rest = [], []
    for i, token in enumerate(argv[at + 1:]):
        prev = argv[at + i] if i else None
        takes_value = prev is not None and getattr(sub._option_string_actions.get(prev), "nargs", 0) is None
        if command in _SETTINGS_DEST and _SETTING.match(token) and not takes_value:
            settings.append(token)
        else:
            rest.append(token)
    ns = sub.parse_intermixed_args(rest)
    ns.command = command
    ns.verbose = getattr(ns, "verbose", False) or at > 0
    if command in _SETTINGS_DEST:
        setattr(ns, _SETTINGS_DEST[command], [*getattr(ns, _SETTINGS_DEST[command]), *settings])
    return ns


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from mimkit.engine import pretrain
    from mimkit.models import load_config

    cfg = load_config(resolve_config_path(args.config), args.overrides)
    run_dir = pretrain(cfg, resume=args.resume, overwrite=args.overwrite)
    print(f"run folder: {run_dir}")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    from mimkit.evaluation.finetune import finetune_config, run_finetune
    from mimkit.viz import save_loss_curve

    cfg = finetune_config(args.run, args.finetune_config, args.overrides, args.scratch, args.arch,
                          args.resume is not None)
    result, path, run_dir = run_finetune(cfg, args.resume, args.overwrite)
    curve = save_loss_curve(run_dir)
    ema = f", weight average {result['top1_ema']:.2f}%" if "top1_ema" in result else ""
    print(f"finetune [{'scratch' if args.scratch else Path(cfg.run_dir).parent.name}] {cfg.data.name}: "
          f"top-1 {result['top1']:.2f}%{ema}  -> {path}  (loss curve {curve})")
    return 0


def _eval_protocol(args: argparse.Namespace):
    """The evaluation config named by ``--eval-config``, with every flag given on the command line over it."""
    from mimkit.config import load_eval_config

    protocol = load_eval_config(args.eval_config)
    for flag, (section, key) in {"k": ("knn", "k"), "temperature": ("knn", "temperature"),
                                 "epochs": ("linprobe", "epochs"), "lr": ("linprobe", "lr"),
                                 "probe_batch_size": ("linprobe", "batch_size"),
                                 "batch_size": ("features", "batch_size"),
                                 "train_fraction": ("features", "train_fraction"),
                                 "blocks": ("features", "blocks")}.items():
        if not hasattr(args, flag):
            continue
        given = getattr(args, flag)
        if given is None:
            setattr(args, flag, getattr(getattr(protocol, section), key))
        else:
            setattr(getattr(protocol, section), key, given)
    return protocol


def _cmd_eval(args: argparse.Namespace) -> int:
    from mimkit.engine.run_folder import check_writable

    _eval_protocol(args)
    from mimkit.evaluation.runner import (
        features_for,
        resolve_subject,
        result_name,
        run_knn,
        run_linprobe,
        write_result,
    )

    run, overrides = _split_args(args.args)
    if args.baseline == "pixels" and args.blocks > 1:
        raise ConfigError(f"--blocks {args.blocks} does not apply to --baseline pixels (raw pixels have no blocks)")
    subject = resolve_subject(run, args.baseline, str(resolve_config_path(args.config)) if args.config else None,
                              overrides, args.seed)
    check_writable(subject.out_dir, "evaluation results", "results and the feature cache are written beside the "
                   "checkpoint (or in the baseline's folder): evaluate a writable copy of the run")
    if args.blocks > 1 and subject.encoder is not None:
        import torch

        d = subject.cfg.data
        try:  # refuse before extracting 70k images, not after
            with torch.no_grad():
                subject.encoder.eval().forward_last_blocks(torch.zeros(1, d.channels, d.img_size, d.img_size),
                                                           args.blocks)
        except ValueError as err:
            raise ConfigError(f"--blocks {args.blocks}: {err}") from None
    from mimkit.engine.distributed import resolve_device
    from mimkit.engine.precision import resolve_precision

    # Raw pixels are read, not computed: autocast does not touch them, so no precision in their name.
    precision = resolve_precision(args.precision, resolve_device(args.device)) if subject.encoder else "fp32"
    settings = {"train_fraction": args.train_fraction, "blocks": args.blocks, "precision": precision}
    if args.command == "knn":
        # The seed draws a random-init encoder's weights; for anything else kNN has no randomness.
        settings |= {"k": tuple(args.k), "temperature": args.temperature,
                     "seed": args.seed if args.baseline == "random" else 0}
    else:
        settings |= {"epochs": args.epochs, "lr": args.lr, "probe_batch_size": args.probe_batch_size,
                     "seed": args.seed}
    feats = features_for(subject, args.device, args.precision, args.batch_size, not args.no_progress,
                         args.train_fraction, args.blocks)
    if args.command == "knn":
        result = run_knn(subject, tuple(args.k), args.temperature, feats)
        summary = "  ".join(f"k={k}: {result[f'top1_k{k}']:.2f}%" for k in args.k)
    else:
        result = run_linprobe(feats, args.epochs, args.lr, args.probe_batch_size, args.seed)
        summary = f"top-1 {result['top1']:.2f}% (train {result['train_top1']:.2f}%)"
    result |= settings
    path = write_result(subject, result_name(subject, args.command, settings), result)
    print(f"{args.command} [{subject.label}] {subject.cfg.data.name}: {summary}  -> {path}")
    return 0


def _cmd_visualize(args: argparse.Namespace) -> int:
    import torch

    from mimkit.data import build_dataset, build_loader, normalizer_for
    from mimkit.data.batch import whole_sets
    from mimkit.engine.checkpoint import MODEL_FILE, build_for_weights, load_weights, resolve_checkpoint
    from mimkit.engine.continuation import load_run_config
    from mimkit.engine.run_folder import check_writable
    from mimkit.evaluation.runner import run_config_for
    from mimkit.models import method_from_config
    from mimkit.viz import save_feature_maps, save_loss_curve, save_reconstructions, save_views

    ckpt = resolve_checkpoint(args.run)
    cfg_path = run_config_for(ckpt)
    cfg = load_run_config(cfg_path)
    method = build_for_weights(lambda: method_from_config(cfg), ckpt / MODEL_FILE, settings=cfg_path)
    reconstructs = method.reconstructs_pixels
    run_dir = cfg_path.parent
    out = Path(args.out) if args.out else run_dir / ("reconstructions.png" if reconstructs else "views.png")
    if out.suffix.lower() != ".png":
        raise ConfigError(f"--out {out}: the figure is a PNG; give a path ending in .png")
    check_writable(out, "the figure", "give --out a writable PNG path")
    if out.is_file() and _first_bytes(out, 8) != b"\x89PNG\r\n\x1a\n":
        raise ConfigError(f"--out {out} is a file that is not a PNG; the figure replaces only an earlier figure: "
                          "choose another --out")
    load_weights(method, ckpt)
    multiple = method.batch_multiple
    num = max(multiple, whole_sets(args.num, multiple))
    if num != args.num:
        print(f"{cfg.method.name} mixes images in sets of {multiple}: showing {num} images, not {args.num}")
    train = build_dataset(cfg.data, "train")
    data = build_dataset(cfg.data, args.split) if args.split != "train" else train
    if num > len(data):
        num = max(multiple, whole_sets(len(data), multiple))
        print(f"the {args.split} split has {len(data)} images: showing {num}")
    title = f"{cfg.method.name} {ckpt.name}"
    torch.manual_seed(args.seed)
    normalize = normalizer_for(train, cfg.data)
    shown = build_loader(data, cfg.data, num, train=False, normalize=normalize)  # the images, resized only
    images = next(iter(shown)).images if reconstructs or args.attention else None
    if reconstructs:
        save_reconstructions(method, images, normalize, out, title=title)
        print(f"reconstructions -> {out}")
    else:
        # No pixels to reconstruct: what the encoder is trained on is the method's augmented views.
        loader = build_loader(data, cfg.data, num, train=True, normalize=normalize, seed=args.seed,
                              views=method.views)
        batch = next(iter(loader))
        save_views(batch.all_views, loader.normalize, out, title=f"{title}: the views it trains on")
        print(f"{cfg.method.name} has no pixel reconstruction; the views it trains on -> {out}")
    if args.attention:
        for png in save_feature_maps(method.eval_module, images, normalize, out.parent,
                                     title=f"{title} ({method.eval_module_name})"):
            print(f"{png.stem} -> {png}")
    try:
        print(f"loss curve -> {save_loss_curve(run_dir)}")
    except FileNotFoundError as err:
        print(f"no loss curve: {err}")
    except OSError as err:
        from mimkit.engine.run_folder import describe_error

        print(f"no loss curve: cannot write it to {run_dir} ({describe_error(err)})")
    return 0


def _cmd_transfer(args: argparse.Namespace) -> int:
    from mimkit.evaluation.transfer import transfer, transfer_table

    data = [o for o in args.overrides if o.startswith("data.")]
    tuning = [o for o in args.overrides if not o.startswith("data.")]
    protocol = _eval_protocol(args)
    rows, path = transfer(args.run, args.datasets, data, args.finetune, args.finetune_config, tuning, args.device,
                          args.precision, not args.no_progress, protocol)
    print(transfer_table(rows, tuple(args.k)))
    print(f"rows -> {path}")
    return 0


def _cmd_resources(args: argparse.Namespace) -> int:
    from mimkit.engine.run_folder import write_json
    from mimkit.evaluation.resources import measure_configs, resources_table

    if args.out:
        from mimkit.engine.run_folder import check_writable

        check_writable(Path(args.out), "the rows", "give --out a writable path")
        _check_replaces_rows(Path(args.out))
    rows = measure_configs(args.configs, args.img_size, args.batch_size, args.steps, args.precision, args.overrides,
                           args.threads, args.breakdown)
    print(resources_table(rows))
    if args.out:
        print(f"rows -> {write_json(Path(args.out), rows)}")
    return 0


def _read_result(path: Path, numbers: tuple[str, ...], problems: list[str]) -> dict | None:
    """A result file checked like typed input: a JSON object with a text ``subject`` and finite numbers.

    An unreadable one (truncated, hand-edited) is left out of the table and named in ``problems``.
    """
    import json

    from mimkit.schema import is_number

    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        problems.append(f"{path} ({type(err).__name__}: {err})")
        return None
    if not isinstance(res, dict) or not isinstance(res.get("subject"), str):
        problems.append(f"{path} (not a result object with a subject)")
        return None
    bad = [k for k in numbers if k in res and not is_number(res[k])]
    if bad:
        problems.append(f"{path} ({', '.join(f'{k}={res[k]!r}' for k in bad)} is not a finite number)")
        return None
    return res


def _first_bytes(path: Path, n: int) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def _check_replaces_rows(path: Path) -> None:
    """Refuse an ``--out`` that exists and is not an earlier ``resources`` JSON (a list of rows)."""
    import json

    if not path.exists():
        return
    try:
        rows = json.loads(path.read_text())
        ok = isinstance(rows, list) and all(isinstance(r, dict) and "config" in r for r in rows)
    except (OSError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"--out {path} exists and is not an earlier resources table; choose another --out")


def _cmd_report(args: argparse.Namespace) -> int:
    from mimkit.engine.checkpoint import MODEL_FILE, latest_checkpoint
    from mimkit.engine.run_folder import DERIVED
    from mimkit.evaluation.finetune import RESULT_FILE

    run_dir = Path(args.run)
    rows, problems = [], []
    # A run folder (its newest checkpoint), or one checkpoint named directly.
    ckpt = run_dir if (run_dir / MODEL_FILE).is_file() else latest_checkpoint(run_dir / "checkpoints")
    folders = ([ckpt] if ckpt else []) + sorted(run_dir.glob("baseline-*"))
    numbers = ("top1_k20", "top1_k200", "top1")
    for folder in folders:
        # One row per evaluation protocol: knn.json, knn-frac0.2.json, knn-blocks3.json, ...
        variants = sorted({p.stem.split("-", 1)[1] if "-" in p.stem else ""
                           for p in (*folder.glob("knn*.json"), *folder.glob("linprobe*.json"))})
        for variant in variants:
            suffix = f"-{variant}" if variant else ""
            res = {kind: _read_result(folder / f"{kind}{suffix}.json", numbers, problems)
                   for kind in ("knn", "linprobe") if (folder / f"{kind}{suffix}.json").is_file()}
            res = {k: v for k, v in res.items() if v is not None}
            if not res:
                continue
            label = next(iter(res.values()))["subject"] + (f" ({variant})" if variant else "")
            knn, lin = res.get("knn", {}), res.get("linprobe", {})
            cell = lambda d, k: f"{d[k]:.2f}" if k in d else "-"  # noqa: E731
            rows.append(f"| {label} | {cell(knn, 'top1_k20')} | {cell(knn, 'top1_k200')} | {cell(lin, 'top1')} |")
    # Fine-tunings of this run (and from-scratch baselines kept beside it): a column of their own.
    tuned = []
    for folder in [run_dir, *sorted(run_dir.glob(DERIVED))]:  # the folder itself when it is a fine-tuning
        last = ckpt if folder == run_dir else latest_checkpoint(folder / "checkpoints")
        if last is not None and (last / RESULT_FILE).is_file():
            res = _read_result(last / RESULT_FILE, ("top1", "top1_ema"), problems)
            if res is not None and "top1" not in res:
                problems.append(f"{last / RESULT_FILE} (no top1)")
            if res is None or "top1" not in res:
                continue
            ema = f" (weight average {res['top1_ema']:.2f})" if "top1_ema" in res else ""
            tuned.append(f"| {res['subject']} ({folder.name}, {last.name}) | - | - | - | {res['top1']:.2f}{ema} |")
    unreadable = f"; unreadable: {'; '.join(problems)} (run the evaluation again to rewrite it)" if problems else ""
    if not rows and not tuned:
        raise ConfigError(f"no knn.json, linprobe.json or finetune.json found for run {run_dir}{unreadable}")
    header = "| encoder | kNN k=20 (%) | kNN k=200 (%) | linear probe (%) |"
    if tuned:
        header, rows = header + " fine-tune (%) |", [r + " - |" for r in rows] + tuned
    print(header + "\n" + "|---" * header.count(" |") + "|")
    print("\n".join(rows))
    for problem in problems:
        print(f"left out, unreadable: {problem}; run the evaluation again to rewrite it")
    return 0


def _run_read_by(args: argparse.Namespace) -> str | None:
    """The run (or checkpoint) a command reads, if any."""
    if args.command in ("knn", "linprobe"):
        return _split_args(args.args)[0]
    if args.command in ("finetune", "export", "transfer", "visualize"):
        return args.run
    return None


def _dispatch(args: argparse.Namespace) -> int:
    from mimkit.models import load_config  # the model code loads only once a command runs

    if args.command == "pretrain":
        return _cmd_pretrain(args)
    if args.command == "finetune":
        return _cmd_finetune(args)
    if args.command == "config":
        print(to_yaml(load_config(resolve_config_path(args.config), args.overrides)), end="")
        return 0
    if args.command in ("knn", "linprobe"):
        return _cmd_eval(args)
    if args.command == "report":
        return _cmd_report(args)
    if args.command == "profile":
        from mimkit.engine.profiler import profile_steps

        cfg = load_config(resolve_config_path(args.config), args.overrides)
        print(profile_steps(cfg, steps=args.steps, top=args.top, shapes=args.shapes).table())
        return 0
    if args.command == "resources":
        return _cmd_resources(args)
    if args.command == "transfer":
        return _cmd_transfer(args)
    if args.command == "export":
        from mimkit.export import export_checkpoint

        out = export_checkpoint(args.run, args.out, args.overwrite)
        print(f"export -> {out}  (load with mimkit.load_encoder({str(out)!r}))")
        return 0
    return _cmd_visualize(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mimkit`` console script."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    # Our own INFO lines only; third-party libraries stay at WARNING.
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        from mimkit.engine.run_folder import reading_run

        # A command that reads a run holds it for reading: refused at once while the run is being
        # written, and no writer starts (or rotates a checkpoint away) until it is done.
        with reading_run(_run_read_by(args)):
            return _dispatch(args)
    except MimkitError as err:
        # One line: a multi-line message (a YAML parser's) is folded so that scripts can grep it.
        print(f"mimkit {args.command}: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except OSError as err:  # the machine's doing (a full disk, a lost mount), not a bug of ours
        from mimkit.engine.run_folder import describe_error

        where = f" ({err.filename})" if err.filename else ""
        print(f"mimkit {args.command}: error: {describe_error(err)}{where}; a run resumes from its last "
              "complete checkpoint with --resume auto", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = "; resume with --resume auto" if args.command in ("pretrain", "finetune") else ""
        print(f"mimkit {args.command}: interrupted{again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["build_parser", "main", "parse_args"]
