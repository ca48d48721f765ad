"""The table of bad input fed through the real ``mimkit`` command line (``tests/test_reliability.py``).

Each case is a command, the class of failure it belongs to (the classes of ``RELIABILITY.md``) and
what must happen: a refusal (exit 2, one line matching ``expect``, the workspace left exactly as it
was) or, with ``rc=0``, a run that succeeds and prints ``expect``. Placeholders: ``{ws}`` is the case's
own copy of the workspace, ``{run}`` its completed tiny run, ``{ckpt}`` that run's newest checkpoint; the
workspace also holds ``dino`` (a tiny DINO run) and ``export`` (the run released by ``mimkit export``).
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
    7: "A run is continued only under its own settings",
    8: "No run is read from under its writer",
    9: "Output places are checked before the work",
    10: "Values read from files are checked like typed ones",
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
#: A new tiny run of another method (the settings below are MAE's decoder's).
OTHER = ("pretrain", "run_dir={ws}/new", *(o for o in TINY if not o.startswith("method.")), "train.epochs=1")
PIX = ("--baseline", "pixels", "--no-progress", "--precision", "fp32", "--batch-size", "8")
FOLDER = ("data.name=imagefolder", "data.img_size=8", "data.channels=3", "run_dir={ws}/evals")


def _folder(name: str) -> tuple[str, ...]:
    return (*FOLDER, f"data.root={{ws}}/{name}")


CASES: list[Case] = [
    # 1. The run folder
    Case("existing-run", 1, RUN, r"run folder .*/run already holds a run \(config\.yaml, metrics\.jsonl, train\.log, "
         r"tb, checkpoints \(2\)\); --resume auto continues it, --overwrite replaces it"),
    Case("resume-shape-mismatch", 1, (*RUN, "backbone.embed_dim=64", "backbone.num_heads=2", "--resume", "auto"),
         r"--resume would continue the run in .*/run under other settings \(backbone\.embed_dim: run 32, now 64\); "
         r"to continue it, give the run's own values \(backbone\.embed_dim=32\)"),
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
         r"dataset unlabelled: none of the 4 images sampled for the normalisation could be decoded; check the "
         r"images under data\.root"),
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
    Case("beit-without-tokenizer", 5, (*OTHER, "method.name=beit"),
         r"method\.tokenizer: name the tokenizer run whose codes BEiT predicts \(train one first: mimkit pretrain "
         r"--config vqvae_fmnist\)"),
    Case("beit-tokenizer-not-a-run", 5, (*OTHER, "method.name=beit", "method.tokenizer={ws}/nothing"),
         r"method\.tokenizer: no run at '.*/nothing' \(a run folder holding config\.yaml\); train the helper first"),
    Case("beit-tokenizer-not-a-tokenizer", 5, (*OTHER, "method.name=beit", "method.tokenizer={run}"),
         r"method\.tokenizer: a MAE run is no tokenizer; name a run of method vqvae"),
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
    Case("init-unknown-timm-model", 5, (*NEW, "init=timm:no_such_vit"),
         r"init=timm:no_such_vit: timm cannot load it \(.*\); give a timm model name"),
    Case("stats-per-channel", 5, ("config", "data.mean=[0.5,0.5,0.5]", "data.std=[0.2,0.2,0.2]"),
         r"data\.mean / data\.std must be both empty .* one per channel of data\.channels, got "
         r"'\[0\.5, 0\.5, 0\.5\] / \[0\.2, 0\.2, 0\.2\]'"),
    Case("data-from-python-by-name", 5, (*NEW, "data.name=torch_dataset"),
         r"data\.name=torch_dataset: this run was trained on a torch Dataset given from Python"),
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
    Case("finetune-without-run", 5, ("finetune",), r"give a pre-training run to fine-tune, or --scratch with --config"),
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
    # 7. Continuing a run
    Case("resume-other-method-setting", 7, (*RUN, "train.ckpt_every_steps=6", "method.mask_ratio=0.5", "--resume",
                                            "auto"),
         r"under other settings \(method\.mask_ratio: run 0\.75, now 0\.5\);.* Only train\.epochs, .* may change"),
    Case("resume-smaller-keep-last", 7, (*RUN, "train.ckpt_every_steps=6", "train.keep_last=1", "--resume", "auto"),
         r"under other settings \(train\.keep_last: run 2, now 1\)"),
    Case("resume-other-precision-and-seed", 7, (*RUN, "train.ckpt_every_steps=6", "train.precision=bf16", "seed=3",
                                                "--resume", "auto"),
         r"under other settings \(seed: run 0, now 3; train\.precision: run \"fp32\", now \"bf16\"\)"),
    Case("resume-named-checkpoint-other-settings", 7, (*NEW, "method.mask_ratio=0.5", "--resume", "{ckpt}"),
         r"--resume would continue the run in .*/run under other settings \(method\.mask_ratio: run 0\.75, now 0\.5"
         r"\); to continue it, give the run's own values \(method\.mask_ratio=0\.75\); to train from its weights "
         r"under new settings, start a new run_dir with init=.*step_00000018"),
    Case("resume-copied-checkpoint-without-config", 7, (*NEW, "--resume", "{ws}/other/step_00000018"),
         r"--resume .*other/step_00000018: no config\.yaml beside it or in its run folder, so its settings cannot be "
         r"compared", setup="other_run"),
    Case("changes-record-other-key", 7, (*RUN, "train.ckpt_every_steps=6", "--resume", "auto"),
         r"config-changes\.jsonl line 1: method\.mask_ratio cannot change on a continuation",
         setup="changes_method_key"),
    Case("changes-record-bare-value", 7, (*RUN, "train.ckpt_every_steps=6", "--resume", "auto"),
         r"config-changes\.jsonl line 1: train\.epochs: expected \{\"from\": \.\.\., \"to\": \.\.\.\}, got 3",
         setup="changes_bare_value"),
    Case("changes-record-bad-value", 7, (*RUN, "train.ckpt_every_steps=6", "--resume", "auto"),
         r"run/config-changes\.jsonl: train\.epochs must be positive, got -1", setup="changes_bad_value"),
    Case("resume-with-odd-metrics-rows", 7, (*RUN, "train.ckpt_every_steps=6", "train.epochs=1.5", "--resume",
                                             "auto"), r"run folder: .*/run", rc=0, setup="odd_metrics_rows"),
    Case("overwrite-while-a-finetuning-runs", 1, (*RUN, "--overwrite"),
         r"run folder .*/run/finetune-fmnist is in use by another mimkit process \(pid \d+\)",
         setup="held_finetuning"),
    Case("export-over-other-files", 1, ("export", "{run}", "--out", "{ws}/imgs", "--overwrite"),
         r"--out .*/imgs holds files that are not an export \(train, val\); --overwrite replaces only an earlier "
         r"export"),
    Case("visualize-out-over-another-file", 1, ("visualize", "{run}", "--out", "{ws}/notes.png"),
         r"--out .*/notes\.png is a file that is not a PNG", setup="png_named_notes"),
    Case("resources-out-over-another-file", 1, ("resources", "mae_fmnist", "--out", "{ws}/bad.yaml"),
         r"--out .*/bad\.yaml exists and is not an earlier resources table"),
    Case("export-over-an-export-with-other-files", 1, ("export", "{run}", "--out", "{ws}/export", "--overwrite"),
         r"--out .*/export holds files that are not an export \(notes\.txt\)", setup="export_with_notes"),
    Case("run-inside-a-checkpoint", 1, ("pretrain", "run_dir={ckpt}/inner", *TINY),
         r"run_dir .*/step_00000018/inner is inside the checkpoints of run .*/run, which checkpoint rotation deletes"),
    Case("run-over-an-export", 1, ("pretrain", "run_dir={ws}/export", *TINY, "--overwrite"),
         r"run_dir .*/export holds a checkpoint or an export \(model\.safetensors\), not a run; a run never "
         r"replaces one, even with --overwrite"),
    Case("export-over-a-run", 1, ("export", "{run}", "--out", "{ws}/dino", "--overwrite"),
         r"--out .*/dino holds a run: an export never replaces a run, even with --overwrite"),
    Case("resume-corrupt-change-record", 7, (*RUN, "train.ckpt_every_steps=6", "--resume", "auto"),
         r"run/config-changes\.jsonl line 1: not valid JSON", setup="corrupt_changes"),
    Case("resume-longer-schedule", 7, (*RUN, "train.ckpt_every_steps=6", "train.epochs=1.5", "--resume", "auto"),
         r"run folder: .*/run", rc=0),
    # 8. Reading a run that is being written
    Case("knn-while-writing", 8, ("knn", "{run}", "--no-progress"),
         r"run .*/run is being written by mimkit process \(pid \d+\): its checkpoints are rotated", setup="hold_lock"),
    Case("linprobe-while-writing", 8, ("linprobe", "{ckpt}", "--no-progress"),
         r"run .*/run is being written by mimkit process \(pid \d+\)", setup="hold_lock"),
    Case("finetune-while-writing", 8, ("finetune", "{run}"), r"run .*/run is being written by mimkit process",
         setup="hold_lock"),
    Case("export-while-writing", 8, ("export", "{run}", "--out", "{ws}/exported"),
         r"run .*/run is being written by mimkit process", setup="hold_lock"),
    Case("transfer-while-writing", 8, ("transfer", "{run}", "--datasets", "fashion_mnist"),
         r"run .*/run is being written by mimkit process", setup="hold_lock"),
    Case("visualize-while-writing", 8, ("visualize", "{run}"), r"run .*/run is being written by mimkit process",
         setup="hold_lock"),
    Case("init-from-a-run-being-written", 8, (*NEW, "init={run}"), r"run .*/run is being written by mimkit process",
         setup="hold_lock"),
    Case("resume-while-being-read", 8, (*RUN, "train.ckpt_every_steps=6", "--resume", "auto"),
         r"run folder .*/run is being read by another mimkit command \(pid \d+", setup="hold_read"),
    # 9. Output places
    Case("unwritable-checkpoints", 9, NEW, r"cannot write .*/new/checkpoints: no permission to write there .*"
         r"so nothing was started", setup="unwritable_checkpoints"),
    Case("unwritable-tensorboard", 9, (*RUN, "train.ckpt_every_steps=6", "train.epochs=2", "--resume", "auto"),
         r"cannot write .*/run/tb: no permission to write there", setup="unwritable_tb"),
    Case("knn-on-a-read-only-run", 9, ("knn", "{run}", "--no-progress"),
         r"cannot write evaluation results to .*/run/checkpoints/step_00000018: .*Read-only file system",
         setup="read_only_run"),
    Case("linprobe-on-a-read-only-run", 9, ("linprobe", "{run}", "--no-progress"),
         r"cannot write evaluation results to .*step_00000018: .*Read-only", setup="read_only_run"),
    Case("transfer-on-a-read-only-run", 9, ("transfer", "{run}", "--datasets", "fashion_mnist"),
         r"cannot write transfer results to .*step_00000018: .*Read-only", setup="read_only_run"),
    Case("finetune-on-a-read-only-run", 9, ("finetune", "{run}"),
         r"cannot write run folder .*/run/finetune-fmnist: .*Read-only", setup="read_only_run"),
    Case("visualize-on-a-read-only-run", 9, ("visualize", "{run}"),
         r"cannot write the figure to .*/run/reconstructions\.png: .*Read-only.*give --out", setup="read_only_run"),
    Case("export-out-below-a-file", 9, ("export", "{run}", "--out", "{ws}/afile/exported"),
         r"cannot write the export to .*/afile/exported: .*afile is not a folder"),
    Case("visualize-out-below-a-file", 9, ("visualize", "{run}", "--out", "{ws}/afile/grid.png"),
         r"cannot write the figure to .*/afile/grid\.png: .*afile is not a folder"),
    Case("resources-out-below-a-file", 9, ("resources", "mae_fmnist", "--out", "{ws}/afile/rows.json"),
         r"cannot write the rows to .*/afile/rows\.json: .*afile is not a folder"),
    # 10. Values read from files
    Case("run-config-not-a-number", 10, ("knn", "{run}"),
         r"run/config\.yaml: backbone\.embed_dim: expected int, got 'wide'", setup="config_not_a_number"),
    Case("run-config-out-of-range", 10, ("export", "{run}", "--out", "{ws}/exported"),
         r"run/config\.yaml: method\.mask_ratio must be in \(0, 1\), got 1\.5", setup="config_bad_ratio"),
    Case("export-config-huge-width", 10, ("knn", "{ws}/export"),
         r"export/model\.safetensors does not fit this architecture: shape mismatches", setup="export_huge"),
    Case("export-config-deep", 10, ("visualize", "{ws}/export"),
         r"export/model\.safetensors does not fit this architecture: (unexpected|missing) keys",
         setup="export_deep"),
    Case("report-truncated-result", 10, ("report", "{run}"),
         r"\| 71\.50 \|(.|\n)*left out, unreadable: .*knn\.json \(JSONDecodeError", rc=0, setup="truncated_knn"),
    Case("report-non-numeric-result", 10, ("report", "{run}"),
         r"left out, unreadable: .*knn\.json \(top1_k20='high' is not a finite number\)", rc=0,
         setup="knn_not_a_number"),
    Case("empty-run-config", 10, ("knn", "{run}"),
         r"run/config\.yaml lacks run_dir, seed, init, data, backbone, method, optim, train: a run writes its "
         r"config\.yaml whole", setup="empty_run_config"),
    Case("finetune-from-a-wide-run-config", 10, ("finetune", "{run}"),
         r"step_00000018/model\.safetensors does not fit this architecture: shape mismatches", setup="run_config_wide"),
    Case("report-finetune-without-top1", 10, ("report", "{run}"),
         r"no knn\.json, .* found .*; unreadable: .*finetune-fmnist/checkpoints/step_00000001/finetune\.json "
         r"\(no top1\)", setup="finetuning_without_top1"),
    Case("run-config-not-utf8", 10, ("knn", "{run}"), r"run/config\.yaml: not UTF-8 text \(invalid start byte",
         setup="config_not_utf8"),
    Case("changes-record-not-utf8", 10, (*RUN, "train.ckpt_every_steps=6", "--resume", "auto"),
         r"run/config-changes\.jsonl: not UTF-8 text", setup="changes_not_utf8"),
    Case("run-config-heads-do-not-divide", 10, ("knn", "{run}"),
         r"run/config\.yaml: backbone\.num_heads 3 does not divide backbone\.embed_dim 32",
         setup="config_heads_do_not_divide"),
    Case("report-on-a-checkpoint", 10, ("report", "{ckpt}"), r"\| mae step_00000018 \| 70\.10 \| 66\.00 \| - \|",
         rc=0, setup="good_knn"),
    Case("report-only-unreadable-results", 10, ("report", "{run}"),
         r"no knn\.json, linprobe\.json or finetune\.json found .*; unreadable: .*knn\.json",
         setup="only_truncated"),
    # 4. Quietly wrong answers
    Case("fmnist-root-missing", 4, ("knn", *PIX, "data.root={ws}/nowhere", "run_dir={ws}/evals"),
         r"data\.root: folder not found: .*/nowhere .*leave data\.root empty for the default location"),
    Case("fmnist-root-without-files", 4, ("knn", *PIX, "data.root={ws}/few", "run_dir={ws}/evals"),
         r"data\.root: no Fashion-MNIST IDX files: .*/few"),
    Case("visualize-unknown-split", 4, ("visualize", "{run}", "--split", "val"),
         r"argument --split: invalid choice: 'val' \(choose from .*train.*test"),
    Case("resources-empty-backbone", 4, ("resources", "mae_fmnist@"),
         r"'mae_fmnist@': nothing after '@'; name a registered backbone \(.*vit_tiny_p4"),
    Case("baseline-beside-the-named-run", 4, ("knn", "{run}", "--baseline", "pixels", "--train-fraction", "0.01",
                                              "--k", "3", "--no-progress"),
         r"-> .*/baseline-beside-the-named-run/run/baseline-pixels/knn-frac0\.01-k3\.json", rc=0),
    Case("visualize-out-without-png", 4, ("visualize", "{run}", "--out", "{ws}/grid"),
         r"--out .*/grid: the figure is a PNG; give a path ending in \.png"),
    Case("visualize-dino", 4, ("visualize", "{ws}/dino", "--num", "4"),
         r"dino has no pixel reconstruction; the views it trains on -> .*dino/views\.png", rc=0),
]
