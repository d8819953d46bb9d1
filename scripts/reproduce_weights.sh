#!/usr/bin/env bash
# Re-trains one shipped checkpoint with the chain of `medrwkv train` commands that made it
# (and, where its recipe has one, the `medrwkv calibrate` that chose its inference settings).
#
#   scripts/reproduce_weights.sh [--dry-run] NAME [WORKDIR]
#
# NAME is a file stem in weights/ (rwkv_unet_t-dsb2018, rwkv_unet_t-kvasir, rwkv_unet_t-busi,
# rwkv_unet_t-interactive).
# Each step continues from the previous step's checkpoint; the steps and the final file go to
# WORKDIR (default runs/NAME), never over weights/.  Data are read from $MEDRWKV_DATA
# (default ../shared/data, as for development).  The steps without --device ran on CPU with
# one thread each (OMP_NUM_THREADS=1, two runs side by side; BUSI's one step on two threads,
# alone, on a faster AVX-512 CPU); those with --device cuda ran on
# one H100 (three runs side by side, --workers 4 each) and need a CUDA build of torch in the
# environment that runs them.  Steps stop by wall-clock minutes, so a re-run lands near, not
# exactly on, the shipped scores; on a faster machine it trains more epochs in the same
# minutes.  --dry-run prints the commands without running them, quoted so that each line can be pasted
# into a shell as it is.
set -euo pipefail
set -f      # no file-name expansion: stem patterns such as benign_* are arguments, not globs

usage() { echo "usage: $0 [--dry-run] NAME [WORKDIR]   (NAME: rwkv_unet_t-dsb2018 | rwkv_unet_t-kvasir | rwkv_unet_t-busi | rwkv_unet_t-interactive)" >&2; exit 2; }

# A command as a shell would need it typed: benign_* stays a pattern, a path with spaces one word.
show() {
    local word line=""
    for word in "$@"; do
        if [[ "$word" =~ ^[A-Za-z0-9_./,:=+@%-]+$ ]]; then line+="$word "; else line+="'${word//\'/\'\\\'\'}' "; fi
    done
    echo "${line% }"
}

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
[ $# -ge 1 ] && [ $# -le 2 ] || usage
NAME="$1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORKDIR="${2:-$ROOT/runs/$NAME}"
DATA_ROOT="${MEDRWKV_DATA:-$ROOT/../shared/data}"

# Per checkpoint: its folder under the data root, the first step's --model (an architecture
# name and its class names) or BASE (another recipe, run first into WORKDIR/BASE, whose
# checkpoint the first step starts from, renamed to CLASSES), and one line of `medrwkv train`
# arguments per step; every step after the first starts from the checkpoint the step before it wrote.
CALIBRATE=""     # `medrwkv calibrate` arguments after the last step, where the recipe has them
BASE=""
case "$NAME" in
rwkv_unet_t-dsb2018)
    DATASET=dsb2018
    FIRST="rwkv_unet_t --class-names background,nucleus"
    STEPS=(
        "--patch-size 128 --batch-size 8 --lr 2e-3 --max-minutes 55 --foreground 0"
        "--patch-size 128 --batch-size 8 --lr 1e-3 --max-minutes 75"
        "--patch-size 128 --batch-size 8 --lr 5e-4 --max-minutes 72"
        "--patch-size 128 --batch-size 8 --lr 4e-4 --ema 0.995 --max-minutes 75"
        "--patch-size 128 --batch-size 8 --lr 2e-4 --ema 0.995 --max-minutes 62"
        "--patch-size 256 --batch-size 16 --lr 5e-4 --ema 0.998 --max-minutes 8.0 --workers 4 --device cuda"
    )
    ;;
rwkv_unet_t-kvasir)
    DATASET=kvasir-seg
    FIRST="rwkv_unet_t --class-names background,polyp"
    STEPS=(
        "--input-scale 0.5 --patch-size 128 --batch-size 8 --lr 2e-3 --max-minutes 75 --foreground 0"
        "--patch-size 128 --batch-size 8 --lr 1e-3 --max-minutes 33 --foreground 0"
        "--patch-size 128 --batch-size 8 --lr 1e-3 --ema 0.995 --max-minutes 115 --foreground 0"
        "--input-scale 0.75 --patch-size 160 --batch-size 8 --lr 1e-3 --ema 0.995 --max-minutes 100 --foreground 0"
        "--input-scale 1.0 --patch-size 256 --batch-size 16 --lr 5e-4 --ema 0.998 --max-minutes 7.3 --foreground 0 --workers 4 --device cuda"
        "--input-scale 1.0 --patch-size 256 --batch-size 16 --lr 2e-4 --ema 0.999 --max-minutes 6.8 --foreground 0 --workers 4 --device cuda"
    )
    ;;
rwkv_unet_t-busi)
    DATASET=busi
    # From the polyp model (ultrasound lesions and polyps are both one blob on a textured
    # background): its recipe runs first.  Epochs are ranked on the val images with a lesion,
    # which the target scores; the normal ones still train.  2 CPU threads, one run.  Seed 1:
    # of the two seeds run (0 and 1), it scored higher on those val images once calibrated.
    BASE=rwkv_unet_t-kvasir
    CLASSES=background,lesion
    STEPS=(
        "--val-include benign_*,malignant_* --input-scale 0.5 --patch-size 192 --batch-size 8 --lr 1e-3 --ema 0.995 --foreground 0 --workers 0 --max-minutes 95 --seed 1"
    )
    # One lesion per image: the threshold, largest-object filter and flips chosen on the val
    # images with a lesion, as the epochs were (a normal image scores Dice 1 or 0).
    CALIBRATE="--split val --include benign_*,malignant_* --try-flips"
    ;;
rwkv_unet_t-interactive)
    DATASET=kvasir-seg
    # Click to fix, for any kind of image: the polyp model grown into a prompt-aware one (its
    # recipe runs first), trained by simulated users on the objects of all three sets (polyps,
    # lesions, every nucleus its own object).  One CPU thread, beside other work; the second
    # step continues the first's kept weights at a lower rate.
    BASE=rwkv_unet_t-kvasir
    CLASSES=background,object
    STEPS=(
        "--interactive --extra-data $DATA_ROOT/busi --extra-data $DATA_ROOT/dsb2018 --window 160 --lr 5e-4 --batch-size 8 --ema 0.995 --max-minutes 85"
        "--class-names background,object --interactive --extra-data $DATA_ROOT/busi --extra-data $DATA_ROOT/dsb2018 --window 160 --lr 3e-4 --batch-size 8 --ema 0.995 --max-minutes 105"
    )
    ;;
*)
    echo "[medrwkv] unknown checkpoint '$NAME'" >&2; usage ;;
esac

DATA="$DATA_ROOT/$DATASET"
if [ "$DRY_RUN" = 0 ]; then
    if [ ! -d "$DATA/images" ]; then
        echo "[medrwkv] no dataset at $DATA (expected images/, masks/, splits.json); set MEDRWKV_DATA to the folder holding $DATASET/" >&2
        exit 1
    fi
    source "$ROOT/scripts/_bootstrap.sh"
    # A chain with GPU steps fails here, before hours of CPU steps, when torch sees no GPU.
    gpu_steps=()
    for i in "${!STEPS[@]}"; do
        [[ " ${STEPS[$i]} " == *" --device cuda "* ]] && gpu_steps+=($((i + 1)))
    done
    if [ ${#gpu_steps[@]} -gt 0 ]; then
        [ -x "$VENV/bin/python" ] || bootstrap ""
        if ! "$VENV/bin/python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
            echo "[medrwkv] $NAME: step(s) ${gpu_steps[*]} of ${#STEPS[@]} ran on a CUDA GPU (--device cuda), but torch in $VENV sees none; run this on a machine with an NVIDIA GPU and a CUDA build of torch in $VENV (--dry-run prints every step's command)" >&2
            exit 1
        fi
    fi
    bootstrap ""
    mkdir -p "$WORKDIR"
fi

if [ -n "$BASE" ]; then
    # The base recipe prints (or runs) its own steps first; this chain starts from its checkpoint.
    base_args=("$BASE" "$WORKDIR/$BASE")
    [ "$DRY_RUN" = 0 ] || base_args=(--dry-run "${base_args[@]}")
    bash "${BASH_SOURCE[0]}" "${base_args[@]}"
    model_args=("$WORKDIR/$BASE/$BASE.safetensors" --class-names "$CLASSES")
else
    # shellcheck disable=SC2206
    model_args=($FIRST)     # the first step's model and class names: several words, split on purpose
fi
last=$(( ${#STEPS[@]} - 1 ))
for i in "${!STEPS[@]}"; do
    if [ "$i" = "$last" ] && [ -z "$CALIBRATE" ]; then out="$WORKDIR/$NAME.safetensors"; else out="$WORKDIR/step-$((i + 1)).safetensors"; fi
    # Word splitting of the step is wanted: it holds several arguments.
    # shellcheck disable=SC2206
    cmd=(medrwkv train --model "${model_args[@]}" --data "$DATA" --split train --val-split val ${STEPS[$i]} --out "$out")
    show "${cmd[@]}"
    if [ "$DRY_RUN" = 0 ]; then
        if [ -f "$out" ]; then
            echo "[medrwkv] $out exists, keeping it (delete it to train this step again)"
        else
            "$VENV/bin/${cmd[0]}" "${cmd[@]:1}"        # $VENV: from _bootstrap.sh
        fi
    fi
    model_args=("$out")
done
if [ -n "$CALIBRATE" ]; then
    out="$WORKDIR/$NAME.safetensors"
    # shellcheck disable=SC2206
    cmd=(medrwkv calibrate --model "${model_args[0]}" --data "$DATA" $CALIBRATE --out "$out")
    show "${cmd[@]}"
    if [ "$DRY_RUN" = 0 ]; then
        if [ -f "$out" ]; then
            echo "[medrwkv] $out exists, keeping it (delete it to calibrate again)"
        else
            "$VENV/bin/${cmd[0]}" "${cmd[@]:1}"
        fi
    fi
fi
[ "$DRY_RUN" = 1 ] || echo "[medrwkv] done: $WORKDIR/$NAME.safetensors (score it with: medrwkv evaluate --model $WORKDIR/$NAME.safetensors --data $DATA --split test)"
