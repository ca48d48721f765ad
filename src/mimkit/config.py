"""Layered configuration: dataclass defaults, then a YAML file, then ``key=value`` overrides.

A YAML file is exactly these dataclasses written out, optionally on top of another: ``base: NAME``
(a packaged config's name, or a path relative to the file) is loaded first and the file's keys are
merged over it, so an ablation cell states only what it changes. Unknown keys are refused with the
valid ones listed. ``backbone`` is an open dictionary because each backbone builder owns its settings;
``method`` is read as the method's own typed ``Config``. Both are checked against their registries
by the composition root, :func:`mimkit.models.load_config`, which is where a config is loaded: this
module imports no model code.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from mimkit.errors import ConfigError
from mimkit.schema import from_dict, require, yaml_load

log = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).parent / "configs"

#: The values of ``optim.clip_mode``.
CLIP_MODES = ("global", "per_param")
#: The values of ``train.precision`` and of the commands' ``--precision``.
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def resolve_config_path(name: str | Path | None, relative_to: Path | None = None) -> Path | None:
    """A YAML path (relative to ``relative_to`` first when given), or a bare name among the packaged configs.

    Raises:
        ConfigError: Neither a file nor a packaged config; the packaged names are listed.

    """
    if name is None:
        return None
    for path in ([relative_to / name] if relative_to is not None else []) + [Path(name)]:
        if path.is_file():
            return path
    for candidate in (CONFIG_ROOT / "pretrain" / f"{name}.yaml", CONFIG_ROOT / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in (CONFIG_ROOT / "pretrain").glob("*.yaml"))
    raise ConfigError(f"config {str(name)!r} not found: not a file, and not a packaged config ({', '.join(known)})")


@dataclass
class DataConfig:
    """Which images to train on and how to augment them."""

    name: str = "fashion_mnist"
    """fashion_mnist | cifar10 | cifar100 | stl10 | imagefolder | unlabelled | folder | tiny_imagenet
    (``folder``: ``imagefolder`` where ``root`` has class sub-folders, else ``unlabelled``);
    ``torch_dataset`` in a run trained on a torch ``Dataset`` given from Python."""
    root: str = ""
    """Dataset folder; empty means the dataset's default location."""
    download: bool = False
    """Allow torchvision to download the dataset when it is missing."""
    img_size: int = 28
    channels: int = 1
    """Channels the model sees: 1 keeps grey images grey, 3 repeats grey to RGB."""
    subset_fraction: float = 1.0
    """Deterministic per-class fraction of the training split (1.0 = all)."""
    subset_seed: int = 0
    randaugment_ops: int = 0
    """RandAugment's N, operations per training image (0 = off); fine-tuning recipes use 2."""
    randaugment_magnitude: int = 9
    """RandAugment's M, in [0, 30]."""
    random_erasing: float = 0.0
    """Probability of erasing a random box of a training image (0 = off; MAE's fine-tuning uses 0.25)."""
    cache: str = "auto"
    """Decode the dataset once into a uint8 tensor: auto (when small) | yes | no."""
    num_workers: int = 0
    """DataLoader workers for streamed (uncached) datasets."""
    mean: list[float] = field(default_factory=list)
    """Per-channel mean, pixels in [0, 1], that images are normalised with. Empty: computed when a run
    starts from an evenly spaced sample of at most 10000 training images decoded at ``img_size``
    (the same whether the data is in memory or streamed) and stored in the run's ``config.yaml``, so
    every later command normalises as training did."""
    std: list[float] = field(default_factory=list)
    """Per-channel standard deviation beside ``mean``; both empty or both one value per channel."""


@dataclass
class OptimConfig:
    """AdamW with per-step linear warmup and cosine decay."""

    batch_size: int = 256
    """Per-process batch; the effective batch is batch_size x accum_steps x world_size."""
    accum_steps: int = 1
    base_lr: float = 1.5e-4
    """Learning rate at an effective batch of 256; lr = base_lr x batch / 256."""
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_epochs: float = 1.0
    clip_grad: float = 0.0
    """Clip the gradient norm to this value; 0 disables clipping. ``clip_mode`` says which norm."""
    clip_mode: str = "global"
    """What ``clip_grad`` bounds: ``global``, the norm of all gradients together, or ``per_param``, each
    parameter's gradient norm on its own (DINO's ``clip_gradients``)."""


@dataclass
class TrainConfig:
    """How long to train and where the engine writes."""

    epochs: float = 10.0
    max_minutes: float = 0.0
    """Stop (with a checkpoint) after this many minutes of training; 0 = no limit."""
    budget_minutes: float = 0.0
    """Fit the warmup + cosine schedule to this many minutes of training: the total step count is
    re-estimated from the measured step rate as the run goes, and the run stops at the budget
    (``epochs`` is then an upper bound; warmup is cut to at most a quarter of the estimated steps).
    For equal-compute comparisons; 0 = schedule by epochs."""
    precision: str = "auto"
    """auto | bf16 | fp16 | fp32 (autocast; fp16 with a gradient scaler); auto = bf16 where the hardware
    computes it natively (CUDA since Ampere, CPUs with AVX512-BF16 or AMX), fp16 on older GPUs, else fp32."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    log_every: int = 20
    ckpt_every_steps: int = 0
    """Extra checkpoints every N optimizer steps; 0 = only at epoch ends and at the end."""
    keep_last: int = 2
    max_bad_steps: int = 10
    """Stop after this many consecutive non-finite losses (each such step is skipped)."""
    eval_every: int = 0
    """Watch the run: every N optimizer steps (and at the last), kNN k=20 of the evaluated module on a
    per-class ``eval_fraction`` of the labelled train split as bank, against the same fraction of
    the test split, logged as ``eval/knn20`` (metrics.jsonl, TensorBoard, the loss-curve picture).
    Not counted as training time. Needs labelled data; 0 = off."""
    eval_fraction: float = 0.05
    """Per-class fraction of each split that ``eval_every`` uses."""
    wandb: str = ""
    """A Weights & Biases project to mirror the run's TensorBoard scalars to (``wandb.init`` with
    ``sync_tensorboard``; a continuation goes on in the same W&B run); needs the optional ``wandb``
    package (``pip install 'mimkit[wandb]'``; ``WANDB_MODE=offline`` works without a network).
    Empty = off."""
    compile: bool = False
    deterministic: bool = False
    progress: bool = True


@dataclass
class PretrainConfig:
    """Everything a pre-training run needs; saved resolved as ``config.yaml`` in the run folder."""

    run_dir: str = "runs/default"
    seed: int = 0
    init: str = ""
    """A checkpoint (or run) whose evaluated module initialises this method's (fine-tuning from a
    pre-trained encoder), or released ViT weights for a ViT backbone: ``timm:NAME`` (timm's pretrained
    tag, e.g. ``timm:vit_small_patch16_224.dino``), ``local-dir:PATH`` (a folder timm saved, such as a
    mimkit export's ``timm/``) or ``hf-hub:ORG/NAME``; empty = random initialisation."""
    data: DataConfig = field(default_factory=DataConfig)
    backbone: dict[str, Any] = field(default_factory=lambda: {"name": "vit_tiny_p4"})
    method: Any = field(default_factory=lambda: {"name": "mae"})
    """The method's settings: its typed ``Config`` (a :class:`~mimkit.methods.base.MethodConfig` with
    ``name``) once composed by :func:`mimkit.models.load_config`; a mapping only in a raw tree."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class KnnConfig:
    """Weighted cosine kNN on frozen features."""

    k: list[int] = field(default_factory=lambda: [20, 200])
    temperature: float = 0.07


@dataclass
class ProbeConfig:
    """Linear probe on frozen, BatchNorm-standardised features."""

    epochs: int = 100
    lr: float = 0.1
    batch_size: int = 1024


@dataclass
class FeatureConfig:
    """How frozen features are extracted."""

    batch_size: int = 512
    train_fraction: float = 1.0
    """Per-class fraction of the labelled train split used as kNN bank / probe training set."""
    blocks: int = 1
    """Concatenate the pooled outputs of the last N blocks."""


@dataclass
class EvalConfig:
    """The frozen-feature protocol (``configs/eval/*.yaml``); CLI flags override it."""

    knn: KnnConfig = field(default_factory=KnnConfig)
    linprobe: ProbeConfig = field(default_factory=ProbeConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)


def load_eval_config(name: str | Path = "default") -> EvalConfig:
    """An evaluation config: a name under ``configs/eval/`` or a YAML path; checked like any config.

    Raises:
        ConfigError: Not found (the packaged names listed), an unknown key, or a value out of range.

    """
    packaged = CONFIG_ROOT / "eval" / f"{name}.yaml"
    path = packaged if packaged.is_file() else Path(name)
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_ROOT / "eval").glob("*.yaml"))
        raise ConfigError(f"evaluation config {str(name)!r} not found: not a file, and not a packaged one "
                          f"({', '.join(known)})")
    cfg = from_dict(EvalConfig, load_yaml(path))
    require(len(cfg.knn.k) >= 1 and all(k >= 1 for k in cfg.knn.k), "knn.k", "positive integers", cfg.knn.k)
    require(cfg.knn.temperature > 0, "knn.temperature", "positive", cfg.knn.temperature)
    require(cfg.linprobe.epochs >= 1, "linprobe.epochs", ">= 1", cfg.linprobe.epochs)
    require(cfg.linprobe.lr > 0, "linprobe.lr", "positive", cfg.linprobe.lr)
    require(cfg.linprobe.batch_size >= 2, "linprobe.batch_size", "at least 2 (BatchNorm)", cfg.linprobe.batch_size)
    require(cfg.features.batch_size >= 1, "features.batch_size", ">= 1", cfg.features.batch_size)
    require(0 < cfg.features.train_fraction <= 1, "features.train_fraction", "in (0, 1]", cfg.features.train_fraction)
    require(cfg.features.blocks >= 1, "features.blocks", ">= 1", cfg.features.blocks)
    return cfg


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[leaf] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["optim.base_lr=1e-3", "method.mask_ratio=0.6"]`` into a nested dict.

    Values are read as YAML 1.2 scalars, so ``1e-3`` is a float, ``true`` a bool, ``no`` a word and
    ``[1, 2]`` a list.
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            raise ConfigError(f"override {item!r}: the value is not a valid YAML scalar or list") from None
        key = key.strip()
        if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key):
            raise ConfigError(f"override {item!r}: {key!r} is not a dotted key such as optim.base_lr")
        _set_dotted(tree, key, value)
    return tree


def merge_layer(base: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """``layer`` merged over ``base``; a ``method`` or ``backbone`` that names another ``name`` replaces
    the whole section, since one method's (or backbone's) settings mean nothing to another.
    """
    base = dict(base)
    for section in ("method", "backbone"):
        named, old = layer.get(section), base.get(section)
        if isinstance(named, dict) and "name" in named and isinstance(old, dict) and named["name"] != old.get("name"):
            base[section] = {}
    return merge_trees(base, layer)


def merge_trees(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` merged over ``base`` key by key (nested mappings merged, other values replaced)."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping, with its ``base:`` chain merged underneath; errors name the file.

    Raises:
        ConfigError: A missing file, invalid YAML, a top level that is not a mapping, an unknown
            base, or a chain of bases that returns to a file already in it.

    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    if "base" not in data:
        return data
    base = data.pop("base")
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a config name or path, got {base!r}")
    try:
        base_path = resolve_config_path(base, path.parent)
    except ConfigError as err:
        raise ConfigError(f"{path}: base: {err}") from err
    chain = (*_chain, path.resolve())
    if base_path.resolve() in chain:
        names = " -> ".join(p.name for p in (*chain, base_path.resolve()))
        raise ConfigError(f"{path}: base configs form a cycle: {names}")
    return merge_layer(load_yaml(base_path, chain), data)


def validate(cfg: PretrainConfig) -> None:
    """Check the data, optimizer and training values against what the engine accepts.

    Every range is checked here, once; :func:`mimkit.models.check_model_config` checks the backbone's
    and method's own settings against their registries. Nothing here depends on the environment: a
    limit that needs the number of processes (``optim.min_lr`` against the peak lr) is checked by
    the trainer, which knows it.
    """
    d, o, t = cfg.data, cfg.optim, cfg.train
    require(d.img_size > 0, "data.img_size", "positive", d.img_size)
    require(d.channels in (1, 3), "data.channels", "1 or 3", d.channels)
    require(0.0 < d.subset_fraction <= 1.0, "data.subset_fraction", "in (0, 1]", d.subset_fraction)
    require(d.randaugment_ops >= 0, "data.randaugment_ops", ">= 0 (0 = off)", d.randaugment_ops)
    require(0 <= d.randaugment_magnitude <= 30, "data.randaugment_magnitude", "in [0, 30]", d.randaugment_magnitude)
    require(0.0 <= d.random_erasing <= 1.0, "data.random_erasing", "in [0, 1]", d.random_erasing)
    require(d.cache in ("auto", "yes", "no"), "data.cache", "auto, yes or no", d.cache)
    require(d.num_workers >= 0, "data.num_workers", ">= 0", d.num_workers)
    require(all(0.0 <= m <= 1.0 for m in d.mean), "data.mean", "values in [0, 1] (pixels scaled to [0, 1])",
            list(d.mean))
    require(all(v > 0 for v in d.std), "data.std", "positive values", list(d.std))
    require(len(d.mean) == len(d.std) and len(d.mean) in (0, d.channels), "data.mean / data.std",
            f"both empty (computed from the data) or both {d.channels} value(s), one per channel of data.channels",
            f"{list(d.mean)} / {list(d.std)}")
    require(o.batch_size > 0, "optim.batch_size", "positive", o.batch_size)
    require(o.accum_steps > 0, "optim.accum_steps", "positive", o.accum_steps)
    require(o.base_lr > 0, "optim.base_lr", "positive", o.base_lr)
    require(o.min_lr >= 0, "optim.min_lr", ">= 0", o.min_lr)
    require(o.weight_decay >= 0, "optim.weight_decay", ">= 0", o.weight_decay)
    require(len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas), "optim.betas",
             "two values in [0, 1)", o.betas)
    require(o.warmup_epochs >= 0, "optim.warmup_epochs", ">= 0", o.warmup_epochs)
    require(o.clip_grad >= 0, "optim.clip_grad", ">= 0 (0 disables clipping)", o.clip_grad)
    require(o.clip_mode in CLIP_MODES, "optim.clip_mode", f"one of {', '.join(CLIP_MODES)}", o.clip_mode)
    require(t.precision in PRECISIONS, "train.precision", f"one of {', '.join(PRECISIONS)}", t.precision)
    require(t.log_every >= 1, "train.log_every", "at least 1", t.log_every)
    require(bool(re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device)), "train.device", "auto, cpu, cuda or cuda:N",
             t.device)
    require(t.epochs > 0, "train.epochs", "positive", t.epochs)
    require(t.budget_minutes >= 0, "train.budget_minutes", ">= 0 (0 = schedule by epochs)", t.budget_minutes)
    require(t.max_minutes >= 0, "train.max_minutes", ">= 0 (0 = no limit)", t.max_minutes)
    require(t.ckpt_every_steps >= 0, "train.ckpt_every_steps", ">= 0 (0 = epoch ends only)", t.ckpt_every_steps)
    require(t.keep_last >= 0, "train.keep_last", ">= 0 (0 keeps all)", t.keep_last)
    require(t.max_bad_steps >= 1, "train.max_bad_steps", "at least 1", t.max_bad_steps)
    require(t.eval_every >= 0, "train.eval_every", ">= 0 (0 = off)", t.eval_every)
    require(0.0 < t.eval_fraction <= 1.0, "train.eval_fraction", "in (0, 1]", t.eval_fraction)
    require(bool(cfg.run_dir.strip()), "run_dir", "a folder path", cfg.run_dir)


def on_other_data(data: DataConfig, own_name: str, own_root: str, overrides: list[str] | None) -> DataConfig:
    """``data`` without a run's stored normalisation when it names other data than the run's own.

    A run's ``data.mean`` / ``data.std`` describe its own images; another dataset (``data.name`` or
    ``data.root`` changed, as ``transfer`` and evaluation overrides do) is normalised with its own
    statistics, unless the ``overrides`` set them.
    """
    given = any(o.startswith(("data.mean=", "data.std=")) for o in overrides or [])
    if given or (data.name, data.root) == (own_name, own_root):
        return data
    return replace(data, mean=[], std=[])


def to_yaml(cfg: Any) -> str:
    """Write a config dataclass out as YAML (the same form :func:`mimkit.models.load_config` reads)."""
    return yaml.safe_dump(asdict(cfg), sort_keys=False)
