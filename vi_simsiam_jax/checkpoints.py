"""Orbax checkpoints of the train state, with the run's config saved beside them.

Layout of a workdir: `config.json` (the pretraining config), `checkpoints/<step>/` (orbax, the
last `keep_checkpoints` kept), `metrics.jsonl` and TensorBoard event files. A workdir alone is
enough to restore the encoder for probing.
"""

import json
import os
from typing import Any

import ml_collections
import orbax.checkpoint as ocp
from absl import logging

CONFIG_FILE = "config.json"
# Loop settings that may change when a run is resumed; every other field must match.
_RESUMABLE_FIELDS = ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints")


def _config_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json())


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes config.json, or checks that a resumed run uses the config it started with."""
    path = os.path.join(workdir, CONFIG_FILE)
    new = _config_dict(config)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        changed = sorted(k for k in old.keys() | new.keys()
                         if k not in _RESUMABLE_FIELDS and old.get(k) != new.get(k))
        if changed:
            raise ValueError(
                f"{workdir} holds a run with a different config (fields {changed}); resume it "
                "with the same config or start the new run in another --workdir.")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(new, f, indent=2)
    os.replace(tmp, path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a pretraining workdir was made with."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} not found: {workdir} is not a pretraining workdir (run "
            "`python -m experiments.pretrain --workdir=...` first).")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def manager(workdir: str, config: ml_collections.ConfigDict | None = None,
            read_only: bool = False) -> ocp.CheckpointManager:
    """CheckpointManager for workdir/checkpoints, keeping config.keep_checkpoints."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=config.keep_checkpoints if config else None,
        create=not read_only, read_only=read_only)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                                 options=options)


def restore_latest(checkpoint_manager: ocp.CheckpointManager, abstract_state: Any,
                   step: int | None = None) -> Any | None:
    """Restores the given step, or the newest readable one; None if there are none.

    A checkpoint that fails to restore (truncated or corrupted files) is reported and the next
    older one is tried, so one bad save never loses the run.
    """
    steps = sorted(checkpoint_manager.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            raise ValueError(f"No checkpoint for step {step} in {checkpoint_manager.directory}; "
                             f"available: {sorted(steps)}.")
        steps = [step]
    for candidate in steps:
        try:
            return checkpoint_manager.restore(candidate,
                                              args=ocp.args.StandardRestore(abstract_state))
        except Exception as error:  # orbax raises many types for damaged files
            if step is not None:
                raise
            logging.warning("Checkpoint at step %d in %s is unreadable (%s: %s); trying an "
                            "older one.", candidate, checkpoint_manager.directory,
                            type(error).__name__, error)
    if steps:
        raise RuntimeError(f"No readable checkpoint in {checkpoint_manager.directory} "
                           f"(tried steps {steps}).")
    return None
