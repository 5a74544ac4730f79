"""The pretraining loop around the pure step of `train`: input, checkpoints, exact resume,
metrics, and the evaluations that run during training. Config checks are `config_schema`'s;
preemption, lost peers and exit statuses `run_control`'s.

Batches and step keys depend only on (seed, step), so a resumed run continues exactly as an
uninterrupted one.
"""

import os
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import jax
import ml_collections
from absl import logging
from flax import jax_utils

from vi_simsiam_jax import (checkpoints, config_schema, datasets, errors, input_pipeline,
                            run_config, run_control, train)
from vi_simsiam_jax.evaluation import encoder, knn_monitor
from vi_simsiam_jax.metric_writer import StepLog
from vi_simsiam_jax.train_state import (AXIS_NAME, TrainState, create_train_state,
                                        hyperparameters, make_model)


class InTrainingEvaluation(Protocol):
    """Scores the encoder every `every_epochs` epochs of training; its numbers go to
    metrics.jsonl and TensorBoard. It reads the encoder and changes nothing of the run (the kNN
    monitor, `knn_monitor.LocalSplitKnn`, is one)."""

    every_epochs: int

    def evaluate(self, frozen: encoder.FrozenEncoder) -> dict[str, float]: ...


def _unreplicate(tree: Any) -> Any:
    """This host's first copy of pmapped outputs, read locally (no cross-host collective)."""
    return jax.tree.map(lambda x: x.addressable_shards[0].data[0], tree)


def _prepared_dataset(config: ml_collections.ConfigDict) -> datasets.VisImages:
    """The prepared dataset config names; crops may not exceed the shorter side of a named
    dataset's images (its ImagesConfig.image_size, e.g. 160 for imagenette-160px)."""
    try:
        builder = datasets.prepare_from_config(config)
    except errors.UserError as error:  # a dataset, archive or data_dir of the config
        raise type(error)(str(error), f"config.{error.setting}") from None
    image_size = builder.builder_config.image_size
    for name in ("global_size", "local_size"):
        if image_size is not None and config[name] > image_size:
            raise errors.UserError(f"Invalid config.{name} = {config[name]}: larger than the "
                                   f"{image_size} px images of {config.dataset}.",
                                   f"config.{name}")
    return builder


def _make_workdir(workdir: str) -> None:
    """Creates workdir; fails before training if it cannot be created or written."""
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as error:
        raise errors.UserError(f"Workdir {workdir} is not writable: {error}", "workdir"
                               ) from error


def pretrain(config: ml_collections.ConfigDict, workdir: str, peer_timeout_s: float = 120.0,
             *, lock_workdir: bool = True, allow_changes: Sequence[str] = (),
             evaluations: Sequence[InTrainingEvaluation] = ()) -> TrainState:
    """Pretrains on config.dataset; resumes from the newest checkpoint in workdir if any.

    Everything the user chose is checked before anything is written: the config's values,
    the dataset (prepared here if need be), the workdir, and that a workdir's earlier run has
    the same config, except fields that may change on resume and those in `allow_changes`
    (recorded in the workdir's config history; `run_config`). Mistakes raise
    errors.UserError. A workdir in use by another live run raises checkpoints.WorkdirInUse;
    lock_workdir=False runs without the lock (filesystems without locking). Only damaged
    checkpoint files are moved aside; one of another structure raises
    checkpoints.CheckpointMismatch and an I/O error is raised, moving nothing.

    `evaluations` run during training, after the kNN monitor (`knn_monitor.LocalSplitKnn`,
    every config.eval_every_epochs epochs; 0: never), which scores the encoder on the local
    split of train.

    Stops with FloatingPointError at the first non-finite step, after the last good
    checkpoint is safely on disk (the bad state is never saved). On SIGTERM it saves a
    checkpoint after the current step and raises run_control.Preempted. Several processes: see
    `run_control` (a lost or failed peer raises LostPeer or ends the process; relaunching every
    process with the same command resumes from the newest checkpoint).
    """
    config_schema.validate(config, jax.device_count())
    builder = _prepared_dataset(config)
    examples = datasets.load_examples(builder, "train")
    steps_per_epoch = input_pipeline.steps_per_epoch(len(examples), config.batch_size)
    if steps_per_epoch == 0:
        raise errors.UserError(f"config.batch_size = {config.batch_size} exceeds the "
                               f"{len(examples)} training images of {config.dataset}.",
                               "config.batch_size")
    history_row = run_config.config_change(workdir, config, datasets.fingerprint(builder),
                                           allow_changes)
    if config.eval_every_epochs:
        evaluations = [knn_monitor.LocalSplitKnn(examples, config.batch_size, config.global_size,
                                                 config.eval_every_epochs), *evaluations]
    _make_workdir(workdir)
    with checkpoints.workdir_lock(workdir, enabled=lock_workdir):
        return _train(config, workdir, builder, examples, steps_per_epoch, peer_timeout_s,
                      history_row, evaluations)


def _non_finite(step: int, metrics: dict[str, Any], config: ml_collections.ConfigDict,
                directory: str, latest: int | None) -> FloatingPointError:
    return FloatingPointError(
        f"Non-finite loss or gradients at step {step} (loss={metrics['loss']}, grad_norm="
        f"{metrics['grad_norm']}); stopping. The newest checkpoint in {directory} (step "
        f"{latest}) predates it and is intact. A resume repeats the same steps exactly and "
        "meets the same failure: resume with a lower learning rate, allowing that change "
        f"(experiments.pretrain: --config.learning_rate={config.learning_rate / 2:g} "
        "--allow_config_change=learning_rate); the change is recorded in the workdir's "
        f"{run_config.HISTORY_FILE}.")


def _train(config: ml_collections.ConfigDict, workdir: str, builder: datasets.VisImages,
           examples: datasets.Examples, steps_per_epoch: int, peer_timeout_s: float,
           history_row: dict[str, Any] | None,
           evaluations: Sequence[InTrainingEvaluation]) -> TrainState:
    """`pretrain` once its checks passed and the workdir is this run's: resumes or starts,
    then trains, with every failure seen as such by every process (`run_control`)."""
    checkpoint_manager = checkpoints.manager(workdir, config)
    try:
        with run_control.controlled(peer_timeout_s, checkpoint_manager.latest_step) as control:
            model = make_model(config)
            rng = jax.random.key(config.seed)
            # Checkpoints hold host (numpy) arrays: the same files for any device or host count.
            state = jax.device_get(create_train_state(rng, config, model))
            restored = checkpoints.restore_latest(checkpoint_manager, state,
                                                  quarantine_corrupt=True)
            state = restored if restored is not None else state
            start_step = int(state.step)
            run_config.save_config(workdir, config, history_row, start_step)
            logging.info("%s at step %d of %d (%d per epoch).",
                         "Resuming" if restored is not None else "Starting", start_step,
                         config.num_epochs * steps_per_epoch, steps_per_epoch)
            source = input_pipeline.pretrain_source(
                examples, config.source_images,
                cache_dir=os.path.join(builder.data_dir, "decoded"),
                stream_max_side=config.stream_max_side)
            # An endless stream, of which the loop takes what it needs.
            batches = input_pipeline.pretrain_batches(source, batch_size=config.batch_size,
                                                      seed=config.seed, start_step=start_step)
            batches = jax_utils.prefetch_to_device(
                ({k: batch[k] for k in ("image", "size", "position")} for batch in batches), 2)
            p_train_step = train.make_p_train_step(model, config)
            hyper = hyperparameters(config, steps_per_epoch)
            # The views and the model draw from this key, the stream position and the step.
            step_rng = jax_utils.replicate(jax.random.fold_in(rng, 1))
            # On the step's own mesh axis: an array placed under another axis name has another
            # type for jit, so the second step (fed the first step's output) would compile again.
            state = jax_utils.replicate(state, axis_name=AXIS_NAME)
            return _run_steps(config, workdir,
                              lambda state, batch: p_train_step(state, batch, step_rng, hyper),
                              state, batches, steps_per_epoch, evaluations, checkpoint_manager,
                              control)
    finally:
        checkpoint_manager.wait_until_finished()
        checkpoint_manager.close()


def _evaluated(config: ml_collections.ConfigDict, evaluation: InTrainingEvaluation,
               state: TrainState, done: int, control: run_control.RunControl
               ) -> dict[str, float]:
    variables = _unreplicate({"params": state.params, "batch_stats": state.batch_stats})
    frozen = encoder.FrozenEncoder(config, make_model(config, axis_name=None), variables, done)
    with control.paused():  # a local computation, as long as it takes on each process
        scores = evaluation.evaluate(frozen)
        run_control.barrier(f"evaluated {done}")
    logging.info("step %d: %s", done, ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
    return scores


def _run_steps(config: ml_collections.ConfigDict, workdir: str, train_step: Any,
               state: TrainState, batches: Iterator[Any], steps_per_epoch: int,
               evaluations: Sequence[InTrainingEvaluation], checkpoint_manager: Any,
               control: run_control.RunControl) -> TrainState:
    """The steps from `state` (replicated) to the end, with logging, the evaluations,
    checkpoints and the SIGTERM vote; returns the final state (one copy)."""
    total_steps = config.num_epochs * steps_per_epoch
    start_step = int(_unreplicate(state.step))
    log = StepLog(config, workdir, start_step, steps_per_epoch)
    try:
        for step in range(start_step, total_steps):
            state, metrics = train_step(state, next(batches))
            metrics = jax.device_get(_unreplicate(metrics))
            if not metrics.pop("finite"):
                raise _non_finite(step, metrics, config, os.fspath(checkpoint_manager.directory),
                                  checkpoint_manager.latest_step())
            log.add(metrics)
            done = step + 1
            stop = control.save_and_stop(done)
            for evaluation in evaluations:
                if done % (evaluation.every_epochs * steps_per_epoch) == 0:
                    log.writer.write(done, _evaluated(config, evaluation, state, done, control))
            if done % config.log_every_steps == 0 or done == total_steps:
                log.flush(done)
            if done % config.checkpoint_every_steps == 0 or done == total_steps or stop:
                with control.paused():  # until every process has saved
                    checkpoints.save(checkpoint_manager, done,
                                     jax.device_get(_unreplicate(state)))
                    run_control.barrier(f"saved {done}")
            if stop:
                raise run_control.Preempted(
                    f"Preempted (SIGTERM) after step {done}; checkpoint saved in "
                    f"{checkpoint_manager.directory}. Rerun the same command to resume.")
    finally:
        log.close()
    return _unreplicate(state)
