"""Defaults shared by the engine, the CLI and the widgets (no torch, so widgets can read them)."""

# Few-shot fine-tuning from a trained model on a handful of corrected images, a few minutes
# on a laptop CPU.  Measured with bench/finetune.py; see bench/RESULTS.md, "Few-shot".
# num_workers 0: a few in-memory images need no loader processes, and forking from a GUI's
# worker thread (napari) is fragile.  Every layer trains (freeze "none"): holding the encoder
# gained least, and fixed BatchNorm statistics won with one draw of images and lost with another.
# Augmentation strength stays 1 (TrainConfig's default): 2 lost 0.1, 0 lost 0.03 in that case.
FEW_SHOT = dict(lr=1e-3, patch_size=256, batch_size=4, samples_per_epoch=16, num_workers=0)
FEW_SHOT_MINUTES = 3.0

# Thresholds `medrwkv calibrate` tries (0.5, the default, always among them).
CALIBRATION_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
