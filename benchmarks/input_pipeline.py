"""Images/s of the pretraining input pipeline on ImageNette-160, with 1 and 2 CPU threads.

    python -m benchmarks.input_pipeline [--data_dir=DIR] [--archive=PATH]

Settings: the crops of experiments/configs/paper.py ("paper": 2x128 global + 4x64 local, SwAV's
recipe scaled to the 160 px images) and of cpu_demo.py (2x64 + 2x32). Batches of --batch_size
(paper: 64) on one device. The thread count is the tf.data private threadpool size (intra-op
parallelism 1). Prints one JSON line; images/s counts source images (each yields all its
views), best of --repeats windows.
"""
import json
import os
import time

from absl import app, flags

from experiments.configs import cpu_demo, paper
from vi_simsiam_jax import datasets, loop
from vi_simsiam_jax import input_pipeline as ip

_DATASET = flags.DEFINE_string("dataset", "imagenette", "Dataset name or folder path.")
_ARCHIVE = flags.DEFINE_string("archive", None, "Local fast.ai archive (.tgz) or folder.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: tfds's).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Images per batch.")
_SECONDS = flags.DEFINE_float("seconds", 4.0, "Seconds per timed window.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed windows per figure (the best is kept).")
_THREADS = flags.DEFINE_list("threads", ["1", "2"], "tf.data threadpool sizes to measure.")

SETTINGS = {"paper": loop.crops_config(paper.get_config()),
            "cpu_demo": loop.crops_config(cpu_demo.get_config())}


def images_per_second(examples: datasets.Examples, crops: ip.MultiCropConfig,
                      threads: int, batch_size: int, seconds: float, repeats: int) -> float:
    """Best throughput over `repeats` windows of >= `seconds` (and >= 3 batches) each.

    Best-of, because the machine may be shared: slower windows measure the other load.
    """
    ds = ip.pretrain_dataset(examples, batch_size=batch_size, seed=0, crops=crops,
                             process_index=0, process_count=1, local_device_count=1,
                             num_threads=threads)
    batches = ds.as_numpy_iterator()
    for _ in range(2):  # Warm-up: graph building and buffers filling.
        next(batches)
    rates = []
    for _ in range(repeats):
        start, n = time.perf_counter(), 0
        while n < 3 or time.perf_counter() - start < seconds:
            next(batches)
            n += 1
        rates.append(n * batch_size / (time.perf_counter() - start))
    return max(rates)


def main(argv):
    del argv
    builder = datasets.prepare(_DATASET.value, data_dir=_DATA_DIR.value, archive=_ARCHIVE.value)
    examples = datasets.load_examples(builder, "train")
    results = {"dataset": builder.builder_config.name, "batch_size": _BATCH_SIZE.value,
               "cpu_count": os.cpu_count()}
    for name, crops in SETTINGS.items():
        views = f"{crops.n_global}x{crops.global_size}+{crops.n_local}x{crops.local_size}"
        results[name] = {"views": views}
        for threads in map(int, _THREADS.value):
            rate = images_per_second(examples, crops, threads, _BATCH_SIZE.value,
                                     _SECONDS.value, _REPEATS.value)
            results[name][f"images_per_s_{threads}_threads"] = round(rate, 1)
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    app.run(main)
