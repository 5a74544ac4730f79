"""VI-SimSiam sized for a 2-core CPU: 64 px global crops, two 32 px local crops, narrower heads,
6 epochs. Same data, method and conventions as the paper configs (Eq. 12's sum over the 6 view
pairs, per-view BatchNorm); only the budget shrinks.

Learning rate 0.001, chosen on ImageNette's local split: the best linear-probe top-1 on the 20%
of train held out from the probe's fit (no val image encoded), 6 epochs, seed 0, among the rates
of this sweep (its scores: results/README.md, "The demo's learning rate"; results/demo_lr.json):

    python -m experiments.tune_lr --config=experiments/configs/cpu_demo.py \
        --learning_rates=0.0005,0.001,0.002,0.005 --workdir=runs/tune_demo \
        --output=results/demo_lr.json

6 epochs: 882 steps on ImageNette (its time: benchmarks/README.md, "Demo config").
"""

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
    config.learning_rate = 0.001
    config.log_every_steps = 10
    config.checkpoint_every_steps = 100
    config.eval_every_epochs = 2  # the kNN monitor at epochs 2, 4 and 6 (its cost: benchmarks/)
    return config
