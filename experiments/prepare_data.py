r"""Prepares a dataset once into a TFDS data_dir and prints one JSON line describing it.

  python -m experiments.prepare_data --dataset=imagenette --archive=PATH --data_dir=DIR

--dataset: imagenette | imagewoof (160px), a config such as imagenette-320px, or the path of
a folder laid out as <path>/train/<class>/<image> (and optionally <path>/val/...).
--archive: a named dataset's .tgz or its extracted folder (not for a folder dataset); default:
looked up in $VI_SIMSIAM_DATASETS (else <repo>/../shared/datasets), else downloaded from its url.
Unreadable images are skipped; their paths are logged and listed under "skipped_files".
"""

from vi_simsiam_jax import launch

launch.configure(__name__)  # first: it may restart the process, and XLA reads its flags once

import json

from absl import app, flags

from vi_simsiam_jax import datasets

_DATASET = flags.DEFINE_string("dataset", "imagenette", "Dataset name or folder path.")
_ARCHIVE = flags.DEFINE_string("archive", None,
                               "Local archive (.tgz) of a named dataset, or its folder.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: tfds's).")


def main(argv):
    del argv
    builder = datasets.prepare(_DATASET.value, data_dir=_DATA_DIR.value, archive=_ARCHIVE.value)
    print(json.dumps({"dataset": _DATASET.value, **datasets.summary(builder)}), flush=True)


if __name__ == "__main__":
    app.run(main)
