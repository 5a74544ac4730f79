"""A pretraining workdir's config: `config.json` (the config in force, read to restore the
encoder) and `config_history.jsonl` (one row per start or change, with the prepared dataset's
fingerprint), and which fields may differ when a run resumes."""

import datetime
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from vi_simsiam_jax import config_schema, errors, files

CONFIG_FILE = "config.json"
HISTORY_FILE = "config_history.jsonl"
# Which fields may differ when a run resumes (`config_schema.FIELDS`): any time; when the
# prepared data is the same (its fingerprint, `datasets.fingerprint`, matches the one recorded
# when the run started); when the user asks for it (allow_changes), e.g. a lower learning rate
# after a non-finite step, recorded in the history.
RESUMABLE_FIELDS = config_schema.fields_on_resume(config_schema.FREE)
DATA_LOCATION_FIELDS = config_schema.fields_on_resume(config_schema.DATA)
CHANGEABLE_FIELDS = config_schema.fields_on_resume(config_schema.ALLOWED)


def _as_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json())


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a pretraining workdir's run is in force with."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise errors.MissingPath(
            f"{path} not found: {workdir} is not a pretraining workdir (run "
            "`python -m experiments.pretrain --workdir=...` first).", "workdir")
    with open(path) as f:
        return config_schema.with_defaults(ml_collections.ConfigDict(json.load(f)))


def _recorded_dataset(workdir: str) -> dict[str, Any] | None:
    path = os.path.join(workdir, HISTORY_FILE)
    if not os.path.exists(path):
        return None  # a workdir written before the history existed
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[-1]["dataset"] if rows else None


def config_change(workdir: str, config: ml_collections.ConfigDict, dataset: dict[str, Any],
                  allow_changes: Sequence[str] = ()) -> dict[str, Any] | None:
    """Checks `config` against the run in workdir (if any) without writing anything.

    Returns the history row to record: the start of a run, or the fields a resume changes
    (other than RESUMABLE_FIELDS); None when nothing changes. Raises errors.UserError for a
    field that may not change, naming the fields and how to go on.
    """
    unknown = sorted(set(allow_changes) - set(CHANGEABLE_FIELDS))
    if unknown:
        raise errors.UserError(f"Cannot allow changes of {unknown}: the fields that may change "
                               f"on resume are {list(CHANGEABLE_FIELDS)}.", "allow_config_change")
    new = _as_dict(config)
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return {"event": "start", "config": new, "dataset": dataset}
    with open(path) as f:
        old = json.load(f)
    changed = sorted(k for k in old.keys() | new.keys()
                     if k not in RESUMABLE_FIELDS and old.get(k) != new.get(k))
    moved_data = [k for k in changed if k in DATA_LOCATION_FIELDS]
    if moved_data and _recorded_dataset(workdir) != dataset:
        raise errors.UserError(
            f"{workdir} holds a run made with other data ({moved_data} changed and the prepared "
            "dataset differs from the one the run recorded, or the run recorded none): resume "
            "it on the same data or start the new run in another --workdir.",
            f"config.{moved_data[0]}")
    refused = [k for k in changed if k not in DATA_LOCATION_FIELDS and k not in allow_changes]
    if refused:
        allowed = [k for k in refused if k in CHANGEABLE_FIELDS]
        raise errors.UserError(
            f"{workdir} holds a run with a different config (fields {refused}); resume it with "
            "the same config or start the new run in another --workdir."
            + (f" To change {allowed} on resume, allow it: --allow_config_change="
               f"{','.join(allowed)}." if allowed else ""), f"config.{refused[0]}")
    if not changed:
        return None
    return {"event": "resume", "changed": {k: [old.get(k), new.get(k)] for k in changed},
            "dataset": dataset}


def save_config(workdir: str, config: ml_collections.ConfigDict,
                row: dict[str, Any] | None = None, step: int = 0) -> None:
    """Process 0 writes config.json and appends `row` (from `config_change`) to the history,
    marked with the step the run starts or resumes at and the time."""
    if jax.process_index() != 0:
        return
    with files.atomic_write(os.path.join(workdir, CONFIG_FILE)) as f:
        json.dump(_as_dict(config), f, indent=2)
    if row is None:
        return
    row = {"step": step, "time": datetime.datetime.now().isoformat(timespec="seconds"), **row}
    path = os.path.join(workdir, HISTORY_FILE)
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as error:
        raise OSError(f"Could not write {path}: {error}") from error
