"""Table 1 at CPU scale (experiments/reproduce_table1.py): the cpu_demo budget, shared by every
dataset and method, with a checkpoint per ~epoch kept for the kNN training curves.

    --config=experiments/configs/table1.py:imagewoof,simsiam   # dataset,method
"""

import ml_collections

from experiments.configs import cpu_demo


def get_config(dataset_and_method: str = "imagenette,vi_simsiam") -> ml_collections.ConfigDict:
    dataset, method = dataset_and_method.split(",")
    config = cpu_demo.get_config()
    config.dataset, config.method = dataset, method
    config.checkpoint_every_steps = 150  # ImageNette / ImageWoof: 147 / 141 steps per epoch
    config.keep_checkpoints = 100
    return config
