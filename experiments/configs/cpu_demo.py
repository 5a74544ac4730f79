"""VI-SimSiam sized for a 2-core CPU: 64 px global crops, two 32 px local crops, narrower heads,
a few epochs. Same data and method as the paper configs; only the budget shrinks."""

import ml_collections

from experiments.configs import paper


def get_config() -> ml_collections.ConfigDict:
    config = paper.get_config()
    config.global_size = 64
    config.local_crops = 2
    config.local_size = 32
    config.model.update(proj_hidden_dim=512, dim=512, pred_dim=128)
    config.batch_size = 64
    config.num_epochs = 6
    config.learning_rate = 0.05
    config.log_every_steps = 10
    config.checkpoint_every_steps = 100
    return config
