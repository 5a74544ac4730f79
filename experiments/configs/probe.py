"""Linear evaluation (paper Sec. 6.2): LARS, lr 1.6, momentum 0.9, weight decay 0, batch 512,
cosine decay; SimSiam's 90 epochs, fc initialised N(0, 0.01) with zero bias.

The learning rate is chosen on the paper's local split (Sec. 6.1: fit on 80% of train, score on
the other 20%) among `lr_sweep`, which includes the paper's 1.6: on ImageNette a batch of 512
gives 18 steps per epoch (SimSiam's ImageNet probe has 312), and LARS at 1.6 is still far from
converged after 90 epochs. An empty lr_sweep uses learning_rate as is.

The default mode "cached" extracts the frozen features once (centre crops) and trains the head on
them, so the encoder runs once per image, not once per epoch. SimSiam's augmented recipe is
`--config.mode=online` (the encoder runs on fresh random-resized-crop + flip images every step),
or, cheaper, `--config.train_views=K` (K augmented copies of the training set, cached).
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # "val": head fit on all of train, scored on val (the reported number); "local_val": the
    # best sweep head's score on the local split, no val image encoded (to choose
    # hyper-parameters).
    config.eval_split = "val"
    # Features: "cached" (extracted once) or "online" (encoder run on every training batch).
    config.mode = "cached"
    # Cached mode: 0 = centre crop of each training image; K > 0 = K random-resized-crop + flip
    # copies of the training set.
    config.train_views = 0
    config.image_size = 0  # 0 = the pretraining global crop size (config.json's global_size)
    config.crop_scale = (0.08, 1.0)  # RandomResizedCrop area range of the augmented recipe
    config.extract_batch_size = 256  # images per encoder forward pass
    # The frozen encoder in bfloat16 (as pretraining's config.half_precision); features, head
    # and metrics stay float32.
    config.half_precision = False

    # Linear head and its optimiser.
    config.batch_size = 512
    config.num_epochs = 90
    config.learning_rate = 1.6  # used when lr_sweep is empty
    config.lr_sweep = (0.4, 1.6, 6.4, 25.6, 102.4)
    config.momentum = 0.9
    config.weight_decay = 0.0
    config.trust_coefficient = 0.001  # LARS eta (SimSiam's LARC)
    # BatchNorm without affine before the fc (MoCo v3 / MAE; not in SimSiam's own probe): the
    # learning rate then does not depend on the feature scale, which differs between encoders.
    config.head_batch_norm = True

    # kNN monitor on the same features (cached mode).
    config.knn_k = 200
    config.knn_temperature = 0.1
    return config
