"""Defaults shared by the engine, the CLI and the widgets (no torch, so widgets can read them)."""

# Few-shot fine-tuning from a trained model on a handful of corrected images, a few minutes
# on a laptop CPU.  Measured with bench/finetune.py; see bench/RESULTS.md, "Few-shot".
# num_workers 0: a few in-memory images need no loader processes, and forking from a GUI's
# worker thread (napari) is fragile.  Every layer trains (freeze "none"): holding the encoder
# gained least, and fixed BatchNorm statistics won with one draw of images and lost with another.
# Augmentation strength stays 1 (TrainConfig's default): 2 lost 0.1, 0 lost 0.03 in that case.
# The kept weights are 3/4 the best epoch's, 1/4 the starting model's (WiSE-FT): in eight draws
# of ten images (polyp model to ultrasound, and two models on more of their own kind) the blend
# scored above the epoch alone in seven, by 0.04 on average across the domain gap.  Not
# everywhere: from the polyp model to bright-field nuclei slides it lost 0.04-0.12, so with
# held-out pairs the epoch alone is kept when it scores higher (engine/train.py, _keep_or_blend).
FEW_SHOT = dict(lr=1e-3, patch_size=256, batch_size=4, samples_per_epoch=16, num_workers=0, blend=0.75)
FEW_SHOT_MINUTES = 3.0

# Thresholds `medrwkv calibrate` tries (0.5, the default, always among them).
CALIBRATION_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
