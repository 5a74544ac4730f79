"""Table 1 at CPU scale (experiments/reproduce_table1.py): the cpu_demo budget for every dataset
and method. reproduce_table1 sets the learning rate and the number of epochs per method (chosen
on the local split of train), and the dataset, method and seed per run.

    --config=experiments/configs/table1.py:imagewoof,simsiam   # dataset,method
"""

import ml_collections

from experiments.configs import cpu_demo


def get_config(dataset_and_method: str = "imagenette,vi_simsiam") -> ml_collections.ConfigDict:
    dataset, method = dataset_and_method.split(",")
    config = cpu_demo.get_config()
    config.dataset, config.method = dataset, method
    config.eval_every_epochs = 0  # the table records z_std as its collapse monitor
    return config
