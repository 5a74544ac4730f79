"""The kNN monitor of pretraining: kNN top-1 on the paper's local split of train (bank: the
centre-crop features of the 80%, scored: the other 20%), so a run shows learning, or collapse,
while it happens without encoding a val image. The loop runs it every
config.eval_every_epochs, as any `loop.InTrainingEvaluation`; it reads the encoder's variables
and changes nothing."""

import dataclasses
import time


from vi_simsiam_jax import datasets
from vi_simsiam_jax.evaluation import encoder, knn


@dataclasses.dataclass(frozen=True)
class LocalSplitKnn:
    """kNN top-1 (k = 200, T = 0.1, as `knn`) of a frozen encoder on the local split of
    `examples` (the training split), on the centre crops of side image_size, every
    `every_epochs` epochs of training."""

    examples: datasets.Examples
    batch_size: int
    image_size: int
    every_epochs: int

    def evaluate(self, frozen: encoder.FrozenEncoder) -> dict[str, float]:
        """{"knn_top1_local_val": percent, "knn_eval_s": seconds taken}."""
        start = time.perf_counter()
        rows = frozen.features(self.examples, self.batch_size, self.image_size)
        scored = datasets.local_val_mask(self.examples.file_names)[rows.index]
        bank, val = rows.subset(~scored), rows.subset(scored)
        top1 = knn.knn_top1(bank.features, bank.labels, val.features, val.labels,
                            num_classes=len(self.examples.label_names))
        return {"knn_top1_local_val": top1, "knn_eval_s": time.perf_counter() - start}
