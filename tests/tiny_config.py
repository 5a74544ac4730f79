"""A pretraining config small enough for tests: 16 px views, width-4 ResNet-18, 16-d heads, XLA's
convolutions.

    --config=tests/tiny_config.py:/path/to/folder_dataset
"""

import ml_collections

from experiments.configs import cpu_demo


def get_config(dataset: str = "imagenette") -> ml_collections.ConfigDict:
    config = cpu_demo.get_config()
    config.dataset = dataset
    config.global_size, config.local_size, config.local_crops = 16, 8, 1
    config.model.update(stem="cifar", width=4, proj_hidden_dim=16, dim=16, pred_dim=8,
                        dtype="float32")  # float64 (with JAX_ENABLE_X64=1): tests of collectives
    config.learning_rate = 0.01  # a few steps move parameters by > 1e-3, far from diverging
    # XLA's own convolutions: half the compile time of the CPU plans, which tests/test_conv.py
    # checks against them (each plan, and the whole training model).
    config.conv = "xla"
    config.batch_size = 8
    config.num_epochs = 2
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.eval_every_epochs = 0  # the demo's kNN monitor; tests/test_pretrain.py turns it on
    return config
