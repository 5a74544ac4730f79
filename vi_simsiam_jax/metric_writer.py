"""Training curves of a pretraining workdir: `metrics.jsonl` and TensorBoard event files.

A resumed run continues from its checkpoint, so rows logged after that step by the run that
stopped are dropped when it resumes: each step appears once in both.
"""

import glob
import json
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tqdm
from absl import logging
from tensorboard.compat.proto import event_pb2

from vi_simsiam_jax import files

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _drop_metrics_after(path: str, step: int) -> None:
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    if len(kept) < len(lines):
        with files.atomic_write(path) as f:
            f.writelines(kept)


def _drop_events_after(path: str, step: int) -> None:
    """Rewrites an event file without the summaries of steps after `step` (its file-version
    record, at step 0, stays)."""
    records = [record.numpy() for record in tf.data.TFRecordDataset(path)]
    kept = [r for r in records if event_pb2.Event.FromString(r).step <= step]
    if len(kept) == len(records):
        return
    with files.replaced_on_success(path) as temporary:
        try:
            with tf.io.TFRecordWriter(temporary) as writer:
                for record in kept:
                    writer.write(record)
        except tf.errors.OpError as error:
            raise OSError(error.message) from error


class MetricWriter:
    """Process 0 writes metrics to workdir/metrics.jsonl and TensorBoard; others write nothing.

    `start_step`: the step the run starts or resumes at; rows of later steps are dropped.
    A write that fails (a full disk) raises OSError naming the file.
    """

    def __init__(self, workdir: str, start_step: int):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self._path = os.path.join(workdir, METRICS_FILE)
        self._events = os.path.join(workdir, TENSORBOARD_DIR)
        if os.path.exists(self._path):
            _drop_metrics_after(self._path, start_step)
        for events in sorted(glob.glob(os.path.join(self._events, "events.out.tfevents.*"))):
            _drop_events_after(events, start_step)
        self._jsonl = open(self._path, "ab", buffering=0)  # a failed write leaves nothing behind
        self._summary = tf.summary.create_file_writer(self._events)

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        try:
            self._jsonl.write((json.dumps({"step": step, **metrics}) + "\n").encode())
        except OSError as error:
            raise OSError(f"Could not write metrics to {self._path}: {error}") from error
        try:
            with self._summary.as_default(step=step):
                for name, value in metrics.items():
                    tf.summary.scalar(name, value)
            self._summary.flush()
        except tf.errors.OpError as error:
            raise OSError(f"Could not write TensorBoard events to {self._events}: "
                          f"{error.message}") from error

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._summary.close()


class StepLog:
    """Metrics of the steps since the last log line: averaged, written (`MetricWriter`),
    shown on the progress bar and logged every config.log_every_steps."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: str, start_step: int,
                 steps_per_epoch: int):
        self._batch_size, self._steps_per_epoch = config.batch_size, steps_per_epoch
        self._total = config.num_epochs * steps_per_epoch
        self.writer = MetricWriter(workdir, start_step)
        self._progress = tqdm.tqdm(total=self._total, initial=start_step, unit="step",
                                   disable=jax.process_index() != 0)
        self._pending: list[dict[str, float]] = []
        self._since = time.perf_counter()

    def add(self, metrics: dict[str, Any]) -> None:
        self._pending.append({k: float(v) for k, v in metrics.items()})
        self._progress.update()

    def flush(self, done: int) -> None:
        now = time.perf_counter()
        summary = {k: float(np.mean([m[k] for m in self._pending])) for k in self._pending[0]}
        summary.update(epoch=done / self._steps_per_epoch,
                       images_per_sec=len(self._pending) * self._batch_size / (now - self._since))
        self.writer.write(done, summary)
        shown = {"loss": f"{summary['loss']:.4f}", "cos": f"{summary['cosine']:.3f}"}
        if "kappa_mean" in summary:
            shown["kappa"] = f"{summary['kappa_mean']:.1f}"
        self._progress.set_postfix(shown)
        logging.info("step %d/%d: %s, %.1f images/s", done, self._total,
                     ", ".join(f"{k} {v}" for k, v in shown.items()), summary["images_per_sec"])
        self._pending, self._since = [], now

    def close(self) -> None:
        self._progress.close()
        self.writer.close()
