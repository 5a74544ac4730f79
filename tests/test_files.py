"""A full disk while writing files: named, the old content kept, no temporary file left."""

import errno
import os

import pytest

from vi_simsiam_jax import files
from vi_simsiam_jax.metric_writer import MetricWriter


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")
    with pytest.raises(OSError, match=f"Could not write {path}: No space left on device"):
        with files.atomic_write(path) as f:
            f.write("new, half written")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["config.json"]
    with files.atomic_write(path) as f:
        f.write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["config.json"]


def test_a_full_disk_while_logging_metrics_is_named(tmp_path):
    """/dev/full fails every write with ENOSPC, as a full disk does."""
    writer = MetricWriter(str(tmp_path), start_step=0)
    try:
        writer._jsonl.close()
        # The metrics file on a disk that is full.
        writer._jsonl = open("/dev/full", "ab", buffering=0)
        with pytest.raises(OSError, match=r"Could not write metrics to .*metrics\.jsonl: .*"
                                          r"No space left on device"):
            writer.write(1, {"loss": 1.0})
    finally:
        writer.close()
