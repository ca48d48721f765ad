#!/usr/bin/env bash
# The device check for a lent GPU, in one call of a few minutes: CUDA, bf16, fp16 with its gradient
# scaler, what precision=auto chooses, and the torchrun (NCCL) path; a few hundred steps of every
# method at 224 px with its throughput and peak CUDA memory
# (`cuda_peak_mib` in each run's metrics.jsonl); the pre-training step against HuggingFace's, the
# fine-tuning step against timm's; `mimkit resources` and `mimkit export` on the GPU.
#
# Here, once (copies the Fashion-MNIST files into the ignored, carried folder .gpu_data):
#   bash benchmarks/gpu_check.sh prepare
# Then through the device tool, with carry [".gpu_data"] and a timeout that leaves room to rerun:
#   bash benchmarks/gpu_check.sh
# Everything lands under $OUT (the device tool's folder), logs included.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "${1:-}" = prepare ]; then
  mkdir -p .gpu_data
  cp /usr/share/datasets/fashion-mnist/*-ubyte.gz .gpu_data/
  grep -qxF ".gpu_data/" .git/info/exclude 2>/dev/null || echo ".gpu_data/" >> .git/info/exclude
  du -sh .gpu_data
  exit 0
fi
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src" PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu_check.log") 2>&1
nvidia-smi || true
$PY -c "import torch, timm; from mimkit.engine.precision import resolve_precision as r
print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0),
'bf16', torch.cuda.is_bf16_supported(), 'native bf16', torch.cuda.is_bf16_supported(including_emulation=False),
'precision=auto ->', r('auto', torch.device('cuda')))"
# 320 steps of 64: 224 px RGB (Fashion-MNIST resized), bf16 autocast on CUDA.
GPU=(data.root=.gpu_data data.img_size=224 data.channels=3 optim.batch_size=64 train.epochs=0.35
     train.device=cuda train.precision=bf16 train.progress=false train.log_every=40 train.keep_last=1)
last() { tail -n 1 "$1/metrics.jsonl"; }
t0=$(date +%s)
$PY -m mimkit pretrain --config mae_fmnist "run_dir=$OUT/mae_vitb" backbone.name=vit_base_patch16 \
    backbone.patch_size=16 method.decoder_dim=512 method.decoder_depth=4 method.decoder_heads=8 "${GPU[@]}"
echo "MAE ViT-B/16: $(last "$OUT/mae_vitb")"
$PY -m mimkit pretrain --config cvt_mae_fmnist "run_dir=$OUT/cvt_mae_cvt13" backbone.name=cvt_13 \
    method.mask_size=16 "${GPU[@]}"
echo "CvT-MAE CvT-13: $(last "$OUT/cvt_mae_cvt13")"
# DINO and iBOT with ViT-S/16: two 224 px global and six 96 px local crops (DINO's own sizes), 96 steps.
TS=("method.views=[{count: 2, scale: [0.4, 1.0], jitter: 0.8, grayscale: 0.2}, {size: 96, scale: [0.05, 0.4], count: 6}]"
    backbone.name=vit_small_patch16 backbone.patch_size=16 method.out_dim=8192 method.hidden_dim=2048
    method.bottleneck_dim=256 method.freeze_last_layer=0.1)
$PY -m mimkit pretrain --config dino_fmnist "run_dir=$OUT/dino_vits" "${TS[@]}" "${GPU[@]}" train.epochs=0.1
echo "DINO ViT-S/16: $(last "$OUT/dino_vits")"
$PY -m mimkit pretrain --config ibot_fmnist "run_dir=$OUT/ibot_vits" "${TS[@]}" "${GPU[@]}" train.epochs=0.1
echo "iBOT ViT-S/16: $(last "$OUT/ibot_vits")"
# data2vec and data2vec 2.0 (four masked clones per teacher pass) on ViT-B/16, data2vec 2.0 on CvT-13.
B16=(backbone.name=vit_base_patch16 backbone.patch_size=16)
$PY -m mimkit pretrain --config data2vec_fmnist "run_dir=$OUT/data2vec_vitb" "${B16[@]}" "${GPU[@]}" train.epochs=0.1
echo "data2vec ViT-B/16: $(last "$OUT/data2vec_vitb")"
$PY -m mimkit pretrain --config data2vec2_fmnist "run_dir=$OUT/data2vec2_vitb" "${B16[@]}" "${GPU[@]}" train.epochs=0.1
echo "data2vec 2.0 ViT-B/16: $(last "$OUT/data2vec2_vitb")"
$PY -m mimkit pretrain --config data2vec2_cvt_fmnist "run_dir=$OUT/data2vec2_cvt13" backbone.name=cvt_13 \
    "${GPU[@]}" train.epochs=0.1
echo "data2vec 2.0 CvT-13: $(last "$OUT/data2vec2_cvt13")"
# BEiT on ViT-B/16: a VQ-VAE tokenizer on a one-block ViT-S/16 (the same 14 x 14 grid) first, then BEiT
# naming its run, with BEiT's own minimum block of 16 patches.
$PY -m mimkit pretrain --config patch_kmeans_fmnist "run_dir=$OUT/vqvae_vits" method.source=encoder \
    backbone.name=vit_small_patch16 backbone.patch_size=16 "${GPU[@]}" train.epochs=0.05
echo "VQ-VAE tokenizer ViT-S/16: $(last "$OUT/vqvae_vits")"
$PY -m mimkit pretrain --config beit_fmnist "run_dir=$OUT/beit_vitb" "${B16[@]}" "method.tokenizer=$OUT/vqvae_vits" \
    method.mask_min_block=16 "${GPU[@]}" train.epochs=0.1
echo "BEiT ViT-B/16: $(last "$OUT/beit_vitb")"
# fp16 autocast with the gradient scaler (what precision=auto gives a GPU without native bf16).
$PY -m mimkit pretrain --config mae_fmnist "run_dir=$OUT/mae_vitb_fp16" "${B16[@]}" method.decoder_dim=512 \
    method.decoder_depth=4 method.decoder_heads=8 "${GPU[@]}" train.precision=fp16 train.epochs=0.1
echo "MAE ViT-B/16 fp16: $(last "$OUT/mae_vitb_fp16")"
# MixMAE on Swin-B/W14 (the released model: windows 14, 14, 14, 7, no shifts) and on CvT-13; MixedAE
# on ViT-B/16 (196 tokens in four sets of 49). 320 steps each; batch 64 is even and a multiple of 4.
$PY -m mimkit pretrain --config mixmae_swin_fmnist "run_dir=$OUT/mixmae_swinb" backbone.name=swin_b_w14 \
    method.decoder_dim=512 method.decoder_depth=4 method.decoder_heads=8 "${GPU[@]}"
echo "MixMAE Swin-B/W14: $(last "$OUT/mixmae_swinb")"
$PY -m mimkit pretrain --config mixmae_cvt_fmnist "run_dir=$OUT/mixmae_cvt13" backbone.name=cvt_13 \
    backbone.strides=[4,2,2] "${GPU[@]}"
echo "MixMAE CvT-13: $(last "$OUT/mixmae_cvt13")"
$PY -m mimkit pretrain --config mixedae_fmnist "run_dir=$OUT/mixedae_vitb" backbone.name=vit_base_patch16 \
    backbone.img_size=224 backbone.patch_size=16 method.decoder_dim=512 method.decoder_depth=4 \
    method.decoder_heads=8 "${GPU[@]}"
echo "MixedAE ViT-B/16: $(last "$OUT/mixedae_vitb")"
$PY -m mimkit finetune "$OUT/mae_vitb" "run_dir=$OUT/mae_vitb/finetune-fmnist" "${GPU[@]}" train.epochs=0.2
echo "fine-tune ViT-B/16: $(last "$OUT/mae_vitb/finetune-fmnist")"
# The torchrun path: NCCL with one process (the lent machine has one GPU), 60 steps.
torchrun --nproc_per_node 1 -m mimkit pretrain --config mae_fmnist "run_dir=$OUT/mae_torchrun" "${GPU[@]}" \
    train.epochs=0.07
echo "torchrun MAE: $(last "$OUT/mae_torchrun")"
# The same pre-training step against HuggingFace's ViTMAEForPreTraining, side by side in one process.
$PY benchmarks/bench_throughput.py --device cuda --precision bf16 fp32 --batch 256 --rounds 3 --steps 20
# Costs at 224 px on the GPU (CUDA max allocated), and the fine-tuning step of ViT-B/16 against timm's.
$PY -m mimkit resources mae_fmnist@vit_base_patch16 cvt_mae_fmnist_s4@cvt_13 mixmae_swin_fmnist@swin_b_w14 \
    mixedae_fmnist@vit_base_patch16 --img-size 224 --batch-size 64 \
    data.channels=3 train.device=cuda --out "$OUT/resources_224.json"
# The packaged colour configs as shipped (224 px, their own batch and views), on synthetic batches.
$PY -m mimkit resources mae_vitb_rgb224 cvt_mae_cvt13_rgb224 cvt_mae_cvt13_rgb224_sparse cvt_mae_cvt13_crop64 dino_vits_rgb224 \
    data2vec2_vitb_rgb224 --batch-size 32 train.device=cuda --out "$OUT/resources_rgb224.json"
$PY benchmarks/bench_finetune_throughput.py --device cuda --img-size 224 --patch 16 --chans 3 --dim 768 \
    --depth 12 --heads 12 --batch 64 --rounds 3 --steps 10
$PY -m mimkit export "$OUT/mae_vitb" --out "$OUT/export_vitb" && ls -la "$OUT/export_vitb"
echo "gpu_check: $(( $(date +%s) - t0 )) s"
