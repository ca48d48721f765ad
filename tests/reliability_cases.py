"""The table of bad input fed through the real ``mimkit`` command line (``tests/test_reliability.py``).

Each case is a command, the class of failure it belongs to (the classes of ``RELIABILITY.md``) and
what must happen: a refusal (exit 2, one line matching ``expect``, the workspace left exactly as it
was) or, with ``rc=0``, a run that succeeds and prints ``expect``. Placeholders: ``{ws}`` is the case's
own copy of the workspace, ``{run}`` its completed tiny run, ``{ckpt}`` that run's newest checkpoint.
``RELIABILITY.md`` lists every case by its id; a test keeps the two in step.
"""

from __future__ import annotations

from dataclasses import dataclass

from conftest import TINY_RUN_OVERRIDES

CLASSES = {
    1: "A run's folder is protected",
    2: "A checkpoint called good is good",
    3: "No hangs",
    4: "No silently wrong results",
    5: "Messages, not tracebacks",
    6: "The command line",
}


@dataclass(frozen=True)
class Case:
    """One row of the table."""

    id: str
    klass: int
    argv: tuple[str, ...]
    expect: str
    """A regex the error line (or, for ``rc=0``, the output) must match."""
    rc: int = 2
    setup: str = ""
    """A name in ``test_reliability.SETUPS``, run on the workspace before the command."""
    writes: bool = False
    """A fault met during training: the new run's files may appear, but nothing that was there changes."""


TINY = tuple(TINY_RUN_OVERRIDES)
NEW = ("pretrain", "run_dir={ws}/new", *TINY, "train.epochs=1")
RUN = ("pretrain", "run_dir={run}", *TINY, "train.epochs=1")
PIX = ("--baseline", "pixels", "--no-progress", "--precision", "fp32", "--batch-size", "8")
FOLDER = ("data.name=imagefolder", "data.img_size=8", "data.channels=3", "run_dir={ws}/evals")


def _folder(name: str) -> tuple[str, ...]:
    return (*FOLDER, f"data.root={{ws}}/{name}")


CASES: list[Case] = [
    # 1. The run folder
    Case("existing-run", 1, RUN, r"run folder .*/run already holds a run \(config\.yaml, metrics\.jsonl, train\.log, "
         r"tb, checkpoints \(2\)\); --resume auto continues it, --overwrite replaces it"),
    Case("resume-shape-mismatch", 1, (*RUN, "backbone.embed_dim=64", "backbone.num_heads=2", "--resume", "auto"),
         r"step_00000018/model\.safetensors does not fit this architecture: shape mismatches .*; resume with the "
         r"run's own settings \(.*/run/config\.yaml\)"),
    Case("resume-missing-path", 1, (*NEW, "--resume", "{ws}/nowhere/step_00000004"),
         r"no complete checkpoint at .*/nowhere/step_00000004"),
    Case("resume-corrupt-path", 1, (*NEW, "--resume", "{ws}/broken_ckpt"),
         r"broken_ckpt/model\.safetensors: cannot read"),
    Case("second-writer", 1, (*RUN, "--resume", "auto"),
         r"run folder .*/run is in use by another mimkit process \(pid \d+\)", setup="hold_lock"),
    Case("resume-and-overwrite", 1, (*RUN, "--resume", "auto", "--overwrite"),
         r"--resume continues a run and --overwrite replaces it; give one of them"),
    Case("other-runs-checkpoint", 1, (*RUN, "--resume", "{ws}/other/step_00000018"),
         r"already holds a run .*--resume .*other/step_00000018 is a checkpoint of another run", setup="other_run"),
    Case("unwritable-run-dir", 1, ("pretrain", "run_dir={ws}/afile/run", *TINY),
         r"cannot write run folder .*/afile/run: .*choose a writable run_dir"),
    # 2. Checkpoints
    Case("all-checkpoints-corrupt", 2, (*RUN, "--resume", "auto"),
         r"no usable checkpoint in .*/run/checkpoints: .*cannot read weights.*cannot read weights.*--overwrite",
         setup="corrupt_all"),
    Case("nan-stop", 2, (*NEW, "optim.base_lr=1e7", "train.max_bad_steps=2", "train.log_every=1"),
         r"(consecutive non-finite steps at step \d+|became NaN or inf by step \d+).*resume with --resume auto",
         writes=True),
    # 3. Hangs
    Case("accum-more-than-batches", 3, (*NEW, "optim.accum_steps=100"),
         r"an epoch of 600 images gives 18 full batches of optim\.batch_size=32, fewer than optim\.accum_steps=100"),
    Case("streamed-fewer-than-batch", 3, ("pretrain", "run_dir={ws}/new", *TINY, "data.name=unlabelled",
         "data.root={ws}/few", "data.cache=no", "data.subset_fraction=1"),
         r"dataset unlabelled has 3 training images, fewer than one batch of optim\.batch_size=32"),
    Case("cached-fewer-than-batch", 3, ("pretrain", "run_dir={ws}/new", *TINY, "data.name=unlabelled",
         "data.root={ws}/few", "data.cache=yes", "data.subset_fraction=1"),
         r"dataset unlabelled has 3 training images, fewer than one batch of optim\.batch_size=32"),
    Case("streamed-all-unreadable", 3, ("pretrain", "run_dir={ws}/new", *TINY, "data.name=unlabelled",
         "data.root={ws}/corrupt", "data.cache=no", "data.subset_fraction=1", "optim.batch_size=4"),
         r"epoch 0 took no optimizer step \(4 unreadable images skipped of 4\)", writes=True),
    Case("cached-all-unreadable", 3, ("pretrain", "run_dir={ws}/new", *TINY, "data.name=unlabelled",
         "data.root={ws}/corrupt", "data.cache=yes", "data.subset_fraction=1", "optim.batch_size=4"),
         r"dataset unlabelled split train is empty"),
    # 4. Silently wrong results
    Case("min-lr-above-peak", 4, (*NEW, "optim.min_lr=0.5"), r"optim\.min_lr must be at most the peak lr 0\.001"),
    Case("negative-weight-decay", 4, (*NEW, "optim.weight_decay=-0.1"), r"optim\.weight_decay must be >= 0, got -0\.1"),
    Case("negative-warmup", 4, (*NEW, "optim.warmup_epochs=-1"), r"optim\.warmup_epochs must be >= 0, got -1\.0"),
    Case("zero-lr", 4, (*NEW, "optim.base_lr=0"), r"optim\.base_lr must be positive, got 0\.0"),
    Case("beta-above-one", 4, (*NEW, "optim.betas=[0.9,1.5]"), r"optim\.betas must be two values in \[0, 1\)"),
    Case("nan-budget", 4, (*NEW, "train.budget_minutes=nan"),
         r"train\.budget_minutes: expected a finite number, got nan"),
    Case("inf-max-minutes", 4, (*NEW, "train.max_minutes=.inf"),
         r"train\.max_minutes: expected a finite number, got inf"),
    Case("negative-keep-last", 4, (*NEW, "train.keep_last=-1"), r"train\.keep_last must be >= 0"),
    Case("zero-subset", 4, (*NEW, "data.subset_fraction=0"), r"data\.subset_fraction must be in \(0, 1\], got 0\.0"),
    Case("zero-depth", 4, (*NEW, "backbone.depth=0"), r"backbone\.depth must be positive, got 0"),
    Case("mask-ratio-one", 4, (*NEW, "method.mask_ratio=1.0"), r"method\.mask_ratio must be in \(0, 1\), got 1\.0"),
    Case("knn-k-zero", 4, ("knn", "{run}", "--k", "0"), r"argument --k: must be a positive integer, got 0"),
    Case("knn-temperature-zero", 4, ("knn", "{run}", "--temperature", "0"),
         r"argument --temperature: must be positive, got 0"),
    Case("folder-without-held-out-split", 4, ("knn", *PIX, *_folder("noval")),
         r"data\.root .*/noval has no test/ or val/ folder: evaluation needs held-out images"),
    Case("single-class", 4, ("knn", *PIX, *_folder("oneclass")),
         r"has 1 class \(a\); evaluation \(kNN, linear probe\) needs at least 2"),
    Case("mismatched-classes", 4, ("linprobe", *PIX, *_folder("mismatch")),
         r"different classes \(only in train: \['b'\]; only held out: \['c'\]\)"),
    Case("blocks-on-pixels", 4, ("knn", *PIX, "--blocks", "2", *_folder("imgs")),
         r"--blocks 2 does not apply to --baseline pixels"),
    Case("model-setting-on-a-run", 4, ("knn", "{run}", "optim.base_lr=1"),
         r"only data\.\* settings apply, not optim\.base_lr=1"),
    Case("config-with-a-run", 4, ("knn", "{run}", "--config", "mae_fmnist"),
         r"--config applies to a baseline without a run"),
    Case("finetune-unlabelled", 4, ("finetune", "{run}", "data.name=unlabelled", "data.root={ws}/few"),
         r"dataset unlabelled has no labels; fine-tuning needs a labelled dataset"),
    Case("finetune-head-size", 4, ("finetune", "{run}", "method.num_classes=7"),
         r"method\.num_classes 7 does not match the 10 classes of dataset fashion_mnist"),
    # 5. Messages, not tracebacks
    Case("heads-do-not-divide", 5, (*NEW, "backbone.num_heads=5"),
         r"backbone\.num_heads 5 does not divide backbone\.embed_dim 32; valid head counts include 1, 2, 4, 8, 16"),
    Case("zero-width", 5, (*NEW, "backbone.embed_dim=0"), r"backbone\.embed_dim must be positive, got 0"),
    Case("cvt-heads-do-not-divide", 5, ("pretrain", "--config", "cvt_mae_fmnist", "run_dir={ws}/new",
         "backbone.num_heads=[1,5,3]", "train.epochs=0.01"),
         r"backbone\.num_heads\[1\] 5 does not divide backbone\.dims\[1\] 96"),
    Case("decoder-heads-do-not-divide", 5, (*NEW, "method.decoder_heads=3"),
         r"method\.decoder_heads 3 does not divide method\.decoder_dim 32"),
    Case("cuda-without-gpu", 5, (*NEW, "train.device=cuda"),
         r"device 'cuda' \(index 0\) is not available: no CUDA GPU"),
    Case("eval-cuda-without-gpu", 5, ("knn", "{run}", "--device", "cuda"), r"device 'cuda' .*no CUDA GPU is visible"),
    Case("truncated-archive", 5, ("knn", "--baseline", "pixels", "data.root={ws}/fmnist_trunc", "run_dir={ws}/evals"),
         r"fmnist_trunc/train-images-idx3-ubyte\.gz: cannot read .*truncated or corrupt"),
    Case("zero-batch-size", 5, ("knn", "{run}", "--batch-size", "0"),
         r"argument --batch-size: must be a positive integer"),
    Case("negative-train-fraction", 5, ("knn", "{run}", "--train-fraction", "-0.5"),
         r"argument --train-fraction: must be in \(0, 1\], got -0\.5"),
    Case("zero-probe-epochs", 5, ("linprobe", "{run}", "--epochs", "0"),
         r"argument --epochs: must be a positive integer"),
    Case("probe-batch-of-one", 5, ("linprobe", "{run}", "--probe-batch-size", "1"),
         r"argument --probe-batch-size: must be at least 2 \(BatchNorm\)"),
    Case("negative-probe-lr", 5, ("linprobe", "{run}", "--lr", "-1"), r"argument --lr: must be positive, got -1"),
    Case("zero-grid", 5, ("visualize", "{run}", "--num", "0"), r"argument --num: must be a positive integer"),
    Case("zero-profile-steps", 5, ("profile", *TINY, "--steps", "0"), r"argument --steps: must be a positive integer"),
    Case("invalid-yaml", 5, ("config", "--config", "{ws}/bad.yaml"), r"bad\.yaml: not valid YAML: .* line \d+"),
    Case("missing-config", 5, ("config", "--config", "nope"), r"config 'nope' not found: .*mae_fmnist"),
    Case("unknown-key", 5, ("config", "optim.lr=1"), r"unknown key\(s\) optim\.lr in optim; valid keys: .*base_lr"),
    Case("unknown-view-key", 5, ("config", "method.views=[{{crop: 0.5}}]"),
         r"method\.views\[0\]: unknown setting\(s\) crop; valid: size, scale, ratio, hflip"),
    Case("view-size-vs-patch", 5, ("config", "--config", "dino_fmnist", "method.views=[{{count: 2}}, {{size: 10}}]"),
         r"method\.views\[1\]\.size 10 is not divisible by backbone\.patch_size 4 \(vit_tiny_p4\); use a multiple of 4 "
         r"such as 8, 12"),
    Case("crop-scale-with-many-views", 5, ("config", "--config", "dino_fmnist", "data.crop_scale=[0.5, 1]"),
         r"data\.crop_scale: the crop and flip of a training image are set per view in method\.views"),
    Case("mix-odd-batch", 5, ("pretrain", "--config", "mixmae_swin_fmnist", "run_dir={ws}/mix", "optim.batch_size=255"),
         r"optim\.batch_size 255 is not a multiple of 2: method mixmae mixes images in sets of 2; use 254, 256"),
    Case("mix-tokens-not-shared", 5, ("pretrain", "--config", "mixedae_fmnist", "run_dir={ws}/mix", "data.img_size=28",
                                      "backbone.img_size=28"),
         r"MixedAE with mix_ratio 0\.25 shares each sample's 49 tokens .* among 4 images, which needs a multiple of 4"),
    Case("image-size-vs-patch", 5, (*NEW, "data.img_size=30"),
         r"data\.img_size 30 is not divisible by backbone\.patch_size 4"),
    Case("missing-data-root", 5, (*NEW, "data.name=imagefolder", "data.root={ws}/nowhere"),
         r"data\.root: folder not found: .*/nowhere"),
    Case("no-results-to-report", 5, ("report", "{ws}/few"), r"no knn\.json, linprobe\.json or finetune\.json found"),
    Case("bad-override-key", 5, ("config", "optim..lr=1"), r"'optim\.\.lr' is not a dotted key"),
    Case("finetune-other-architecture", 5, ("finetune", "{run}", "backbone.embed_dim=64"),
         r"step_00000018/model\.safetensors does not fit this architecture: shape mismatches"),
    Case("finetune-too-many-blocks", 5, ("finetune", "{run}", "method.trainable_blocks=9"),
         r"method\.trainable_blocks 9 is more than the 2 parameter groups of this backbone; use -1 for all, or 0 to 2"),
    Case("finetune-without-run", 5, ("finetune",), r"give a pre-training run to fine-tune, or --scratch with --arch"),
    Case("export-over-files", 1, ("export", "{run}", "--out", "{ws}/few"),
         r"export folder .*/few already holds files; pass --overwrite to replace them, or choose another --out"),
    Case("export-no-checkpoint", 5, ("export", "{ws}/few", "--out", "{ws}/exported"),
         r"no complete checkpoint at .*/few"),
    Case("transfer-bad-dataset", 5, ("transfer", "{run}", "--datasets", "cifar10:colour=1"),
         r"dataset 'cifar10:colour=1': 'colour' is not a data setting; valid: root"),
    Case("transfer-other-channels", 4, ("transfer", "{run}", "--datasets", "fashion_mnist:channels=3"),
         r"data\.channels=3 but the encoder takes 1 channel\(s\)"),
    Case("transfer-missing-folder", 5, ("transfer", "{run}", "--datasets", "fashion_mnist",
                                        "imagefolder:root={ws}/nowhere"), r"data\.root: folder not found: .*/nowhere"),
    Case("transfer-settings-without-finetune", 6,
         ("transfer", "{run}", "--datasets", "fashion_mnist", "train.epochs=1"),
         r"train\.epochs=1: settings other than data\.\* are fine-tuning settings and apply with --finetune only"),
    Case("resources-unknown-config", 5, ("resources", "mae_fmnist", "nope"), r"config 'nope' not found"),
    Case("resources-unknown-backbone", 5, ("resources", "mae_fmnist@vit_huge"),
         r"backbone\.name 'vit_huge' is unknown; valid: .*vit_base_patch16"),
    # 6. The command line
    Case("options-between-settings", 6, ("config", "optim.base_lr=2e-3", "--config", "mae_fmnist", "train.epochs=3"),
         r"base_lr: 0\.002(.|\n)*epochs: 3\.0", rc=0),
    Case("resume-between-settings", 6, ("pretrain", "run_dir={ws}/new", *TINY[:5], "--resume", "auto", *TINY[5:],
         "train.epochs=0.2"), r"run folder: .*/new", rc=0),
    Case("baseline-between-settings", 6, ("knn", "data.name=imagefolder", "--baseline", "pixels", "data.img_size=8",
         "--k", "3", "data.channels=3", "data.root={ws}/imgs", "--no-progress", "run_dir={ws}/evals"),
         r"k=3: 100\.00%", rc=0),
    Case("cache-no", 6, ("config", "data.cache=no", "data.hflip=off"), r"cache: 'no'\n(.|\n)*hflip: 0\.0", rc=0),
    Case("cache-no-in-yaml", 6, ("config", "--config", "{ws}/cache_no.yaml"), r"cache: 'no'", rc=0),
    Case("unknown-option", 6, ("pretrain", "--bogus"),
         r"unrecognized arguments: --bogus \(see mimkit pretrain --help\)"),
    Case("not-a-setting", 6, ("config", "optim"), r"override 'optim' is not of the form key=value"),
    Case("bad-choice", 6, ("knn", "{run}", "--baseline", "noise"),
         r"argument --baseline: invalid choice: 'noise' \(choose from .*pixels.*random"),
]
