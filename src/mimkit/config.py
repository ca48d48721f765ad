"""Layered configuration: dataclass defaults, then a YAML file, then ``key=value`` overrides.

A YAML file is exactly these dataclasses written out, optionally on top of another: ``base: NAME``
(a packaged config's name, or a path relative to the file) is loaded first and the file's keys are
merged over it, so an ablation cell states only what it changes. Unknown keys are refused with the
valid ones listed. ``backbone`` and ``method`` are open dictionaries because each backbone builder and
each method owns its settings; they are validated against the registries in :func:`validate`.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_ROOT = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration value or key that cannot be used; the message names it."""


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
    """fashion_mnist | cifar10 | cifar100 | stl10 | imagefolder | unlabelled | tiny_imagenet."""
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
    crop_scale: list[float] = field(default_factory=lambda: [0.35, 1.0])
    """RandomResizedCrop area range; [1, 1] disables cropping."""
    hflip: bool = True
    cache: str = "auto"
    """Decode the dataset once into a uint8 tensor: auto (when small) | yes | no."""
    num_workers: int = 0
    """DataLoader workers for streamed (uncached) datasets."""


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
    """Clip the gradient norm to this value; 0 disables clipping."""


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
    """auto | fp32 | bf16 (autocast); auto = bf16 on CUDA and on CPUs with native bf16, else fp32."""
    device: str = "auto"
    """auto | cpu | cuda | cuda:N."""
    log_every: int = 20
    ckpt_every_steps: int = 0
    """Extra checkpoints every N optimizer steps; 0 = only at epoch ends and at the end."""
    keep_last: int = 2
    max_bad_steps: int = 10
    """Stop after this many consecutive non-finite losses (each such step is skipped)."""
    compile: bool = False
    deterministic: bool = False
    progress: bool = True


@dataclass
class PretrainConfig:
    """Everything a pre-training run needs; saved resolved as ``config.yaml`` in the run folder."""

    run_dir: str = "runs/default"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    backbone: dict[str, Any] = field(default_factory=lambda: {"name": "vit_tiny_p4"})
    method: dict[str, Any] = field(default_factory=lambda: {"name": "mae"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Check ``value`` against a field type, converting where the YAML reading is unambiguous."""
    origin = typing.get_origin(typ)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is float and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string; as a float setting it is meant as a number.
        try:
            return float(value)
        except ValueError:
            pass
    if typ in (int, float, str, bool):
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(typ)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "", also_valid: tuple[str, ...] = ()) -> Any:
    """Build dataclass ``cls`` from a nested dict, refusing unknown keys.

    Args:
        cls: A dataclass type.
        data: Values to set; missing keys keep their defaults.
        prefix: Dotted path used in error messages.
        also_valid: Keys the caller handles itself (listed as valid in the error, e.g. ``name``).

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: On an unknown key (the valid keys are listed) or a value of the wrong type.

    """
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    types = _field_types(cls)
    unknown = sorted(set(data) - set(types))
    if unknown:
        where = prefix.rstrip(".") or "config"
        raise ConfigError(
            f"unknown key(s) {', '.join(prefix + k for k in unknown)} in {where}; "
            f"valid keys: {', '.join([*also_valid, *sorted(types)])}"
        )
    kwargs = {}
    for key, value in data.items():
        typ = types[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = from_dict(typ, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, typ, prefix + key)
    return cls(**kwargs)


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

    Values are read as YAML scalars, so ``1e-3`` is a float, ``true`` a bool, ``[1, 2]`` a list.
    """
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        # YAML 1.1 reads "1e-3" as a string; numbers written that way are meant as floats.
        if isinstance(value, str):
            try:
                value = float(value) if any(c in value for c in ".eE") else value
            except ValueError:
                pass
        _set_dotted(tree, key.strip(), value)
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
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
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
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
    return _merge(load_yaml(base_path, chain), data)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> PretrainConfig:
    """Defaults, then the YAML at ``path``, then ``key=value`` overrides; validated.

    Args:
        path: A YAML file, or None for the defaults.
        overrides: ``key=value`` strings with dotted keys.

    Returns:
        The resolved :class:`PretrainConfig`.

    """
    tree: dict[str, Any] = asdict(PretrainConfig())
    if path is not None:
        tree = _merge(tree, load_yaml(path))
    tree = _merge(tree, parse_overrides(overrides or []))
    cfg = from_dict(PretrainConfig, tree)
    validate(cfg)
    return cfg


def validate(cfg: PretrainConfig) -> None:
    """Check values against what the registries and the engine accept, before any work starts."""
    from mimkit.backbones import check_backbone_cfg, check_backbone_input
    from mimkit.methods import check_method_cfg

    check_backbone_cfg(cfg.backbone)
    check_method_cfg(cfg.method)
    d, o, t = cfg.data, cfg.optim, cfg.train
    if d.img_size <= 0:
        raise ConfigError(f"data.img_size must be positive, got {d.img_size}")
    check_backbone_input(cfg.backbone, d.img_size)
    if d.channels not in (1, 3):
        raise ConfigError(f"data.channels must be 1 or 3, got {d.channels}")
    if not 0.0 < d.subset_fraction <= 1.0:
        raise ConfigError(f"data.subset_fraction must be in (0, 1], got {d.subset_fraction}")
    if len(d.crop_scale) != 2 or not 0.0 < d.crop_scale[0] <= d.crop_scale[1] <= 1.0:
        raise ConfigError(f"data.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {d.crop_scale}")
    if d.cache not in ("auto", "yes", "no"):
        raise ConfigError(f"data.cache must be auto, yes or no, got {d.cache!r}")
    if o.batch_size <= 0 or o.accum_steps <= 0:
        raise ConfigError("optim.batch_size and optim.accum_steps must be positive")
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas must have two values, got {o.betas}")
    if t.precision not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision must be auto, fp32 or bf16, got {t.precision!r}")
    if t.log_every < 1:
        raise ConfigError(f"train.log_every must be at least 1, got {t.log_every}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
        raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    if t.epochs <= 0:
        raise ConfigError(f"train.epochs must be positive, got {t.epochs}")
    if t.budget_minutes < 0 or t.max_minutes < 0:
        raise ConfigError(f"train.budget_minutes and train.max_minutes must be >= 0, got "
                          f"{t.budget_minutes} and {t.max_minutes}")


def to_yaml(cfg: Any) -> str:
    """Write a config dataclass out as YAML (the same form :func:`load_config` reads)."""
    return yaml.safe_dump(asdict(cfg), sort_keys=False)
