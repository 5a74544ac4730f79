"""The paper's pretraining setting (Sec. 6.2): ResNet-18, SGD lr 1e-3, wd 1e-4, momentum 0.9,
cosine decay, batch 64, 200 epochs, multi-crop. Other configs start from this one.

    --config=experiments/configs/paper.py:imagewoof,simsiam   # dataset,method

(default "imagenette,vi_simsiam").

The paper says only "multi-crop" (SwAV's); the crops are our choice for the 160 px data: 2 global
crops of 128 px with SimSiam's scale 0.2-1 and 4 local crops of 64 px with scale 0.05-0.2, the
area range below the global one (SwAV itself splits at 0.14: 0.14-1 and 0.05-0.14). The other
augmentations are SimSiam's, the Gaussian-blur sigma in [0.1, 2] output pixels as in SimSiam's
code whatever the crop size; blur_relative=True scales it to the crop instead
(augment.MultiCropConfig).
"""

import ml_collections


def get_config(dataset_and_method: str = "imagenette,vi_simsiam") -> ml_collections.ConfigDict:
    dataset, method = dataset_and_method.split(",")
    config = ml_collections.ConfigDict()
    config.seed = 0

    # Data: "imagenette", "imagewoof" or a folder with train/<class>/* and val/<class>/*.
    config.dataset = dataset
    config.data_dir = ""  # tfds data_dir; empty = the tfds default (~/tensorflow_datasets)
    config.archive = ""  # local .tgz or extracted folder; empty = $VI_SIMSIAM_DATASETS lookup

    # Multi-crop views (global crops are the only targets).
    config.global_crops = 2
    config.global_size = 128
    config.global_scale = (0.2, 1.0)
    config.local_crops = 4
    config.local_size = 64
    config.local_scale = (0.05, 0.2)
    config.blur_relative = False  # True: blur sigma scaled by crop size / 224
    # Source images, augmented on the device: each shrunk, if larger, to fit stream_max_side x
    # stream_max_side (in both modes, despite the name) and padded to the split's canvas (its
    # largest fitted height x width); decoded once and held in memory ("memory") or decoded as
    # read ("stream"), the same images either way; "auto" picks memory when the split fits in a
    # quarter of the host's RAM (input_pipeline). 256 px is a pipeline setting, not a tuned one:
    # above every crop size of the configs (<= 224).
    config.source_images = "auto"
    config.stream_max_side = 256

    # Method: "vi_simsiam" (Eq. 12) or "simsiam" (Eq. 1); target "stopgrad" (SimSiam) or "ema"
    # (BYOL / VI-BYOL): decay ema_decay, raised to 1 over training by a cosine (BYOL's
    # schedule) or kept "constant".
    config.method = method
    # Reduction of the loss over the view pairs: "paper" = VI-SimSiam's sum (Eq. 12, Alg. 1) and
    # SimSiam's mean (Eq. 1), or "mean" / "sum" for both (vi_simsiam_jax.losses).
    config.loss_reduction = "paper"
    config.target = "stopgrad"
    config.ema_decay = 0.996
    config.ema_schedule = "cosine"
    # bn_views: "separate" BatchNorm statistics per view (SimSiam's code) or "joint" among the
    # same-size views (SwAV/DINO multi-crop); vi_simsiam_jax.models.
    config.model = ml_collections.ConfigDict(dict(
        stem="imagenet", width=64, zero_init_residual=True, proj_hidden_dim=2048, dim=2048,
        pred_dim=512, kappa_map="softplus", kappa_min=1.0, bn_views="separate"))
    # Convolution and pooling (vi_simsiam_jax.backends): "auto" (the XLA:CPU plans of
    # vi_simsiam_jax.cpu on the CPU, XLA's own elsewhere), "xla" (XLA's own everywhere) or
    # "cpu_<policy>" (the CPU plans with one policy). Same parameters and values.
    config.conv = "auto"
    # bfloat16 convolutions and dense layers (mixed precision, as flax's examples/imagenet);
    # parameters, optimiser state, BatchNorm statistics and the losses stay float32. Off: the
    # paper's float32; bfloat16 is for accelerators' matrix units (its speed on a CPU:
    # benchmarks/README.md, "Half precision").
    config.half_precision = False

    # Optimisation.
    config.batch_size = 64  # global, over all devices and hosts
    config.num_epochs = 200
    config.learning_rate = 1e-3
    config.warmup_epochs = 0.0
    config.momentum = 0.9
    config.weight_decay = 1e-4
    config.fix_predictor_lr = False

    # Loop.
    config.log_every_steps = 50
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3
    # kNN monitor every N epochs: top-1 on the local split of train (no val image), written to
    # metrics.jsonl and TensorBoard; 0: off.
    config.eval_every_epochs = 0
    return config
