"""The pretraining config's fields: each one's check, whether it may change when a run resumes,
and the value a config written before the field existed takes. What each field means is
documented where its default is set (experiments/configs/paper.py).

`validate` raises errors.UserError naming the first field with a bad value, before anything is
written; `run_config` reads the resume rules; the other modules only assert what a programming
error would break.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import ml_collections

from vi_simsiam_jax import (backends, errors, input_pipeline, losses, methods, models,
                            train_state)

# Whether a field may differ when a run resumes:
FIXED = "fixed"  # no: the run would no longer be one run
FREE = "free"  # yes: how the loop runs or computes, not what it computes
DATA = "data"  # where the data lives: when the prepared data is the same (run_config)
ALLOWED = "allowed"  # when the user allows it (--allow_config_change), recorded in the history
_ABSENT = object()

Check = Callable[[ml_collections.ConfigDict, int], bool]  # (config, number of devices) -> ok


@dataclasses.dataclass(frozen=True)
class Field:
    check: Check | None = None
    # Completes "must be ...", formatted with num_devices (or a function that returns it).
    expected: str | Callable[[], str] = ""
    on_resume: str = FIXED
    default: Any = _ABSENT  # for configs written before the field existed


def _one_of(name: str, choices: tuple[str, ...], **kwargs: Any) -> Field:
    def check(config: ml_collections.ConfigDict, _: int) -> bool:
        return _value(config, name) in choices

    return Field(check, f"one of {choices}", **kwargs)


def _scale(name: str) -> Field:
    def check(config: ml_collections.ConfigDict, _: int) -> bool:
        low, high = config[name]
        return 0 < low <= high <= 1

    return Field(check, "0 < min <= max <= 1")


FIELDS: dict[str, Field] = {
    "data_dir": Field(on_resume=DATA),
    "archive": Field(on_resume=DATA),
    # Read when checked: a method may be registered after this module is imported.
    "method": Field(lambda c, _: c.method in methods.REGISTRY,
                    lambda: f"one of the registered methods {sorted(methods.REGISTRY)}"),
    "target": _one_of("target", models.TARGETS),
    "loss_reduction": _one_of("loss_reduction", losses.REDUCTIONS),
    "ema_schedule": _one_of("ema_schedule", train_state.EMA_SCHEDULES),
    "model.bn_views": _one_of("model.bn_views", models.BN_VIEWS),
    "model.stem": _one_of("model.stem", models.STEMS),
    "model.kappa_map": _one_of("model.kappa_map", models.KAPPA_MAPS),
    "model.kappa_min": Field(lambda c, _: c.model.kappa_min >= 0, ">= 0"),
    "conv": _one_of("conv", backends.LAYER_CHOICES, on_resume=FREE, default="auto"),
    "half_precision": Field(lambda c, _: isinstance(c.half_precision, bool), "True or False",
                            on_resume=FREE, default=False),
    "learning_rate": Field(lambda c, _: c.learning_rate > 0, "positive", on_resume=ALLOWED),
    "weight_decay": Field(lambda c, _: c.weight_decay >= 0, ">= 0", on_resume=ALLOWED),
    "momentum": Field(lambda c, _: 0 <= c.momentum < 1, "in [0, 1)", on_resume=ALLOWED),
    "ema_decay": Field(lambda c, _: 0 <= c.ema_decay < 1, "in [0, 1)", on_resume=ALLOWED),
    "num_epochs": Field(lambda c, _: c.num_epochs > 0, "positive", on_resume=ALLOWED),
    "warmup_epochs": Field(lambda c, _: 0 <= c.warmup_epochs <= c.num_epochs,
                           "in [0, num_epochs]", on_resume=ALLOWED),
    "global_crops": Field(lambda c, _: c.global_crops >= 1 and c.global_crops + c.local_crops >= 2,
                          ">= 1, with local_crops at least 2 views"),
    "local_crops": Field(lambda c, _: c.local_crops >= 0, ">= 0"),
    "global_scale": _scale("global_scale"),
    "local_scale": _scale("local_scale"),
    "batch_size": Field(lambda c, n: c.batch_size > 0 and c.batch_size % n == 0,
                        "a positive multiple of the {num_devices} devices"),  # of all hosts
    "source_images": _one_of("source_images", input_pipeline.SOURCES),
    "stream_max_side": Field(lambda c, _: c.stream_max_side >= c.global_size,
                             "at least global_size"),
    "log_every_steps": Field(lambda c, _: c.log_every_steps > 0, "positive", on_resume=FREE),
    "eval_every_epochs": Field(lambda c, _: c.eval_every_epochs >= 0,
                               ">= 0 (0: no kNN monitor)", on_resume=FREE),
    "checkpoint_every_steps": Field(lambda c, _: c.checkpoint_every_steps > 0, "positive",
                                    on_resume=FREE),
    "keep_checkpoints": Field(lambda c, _: c.keep_checkpoints > 0, "positive", on_resume=FREE),
}


def _value(config: ml_collections.ConfigDict, name: str) -> Any:
    for part in name.split("."):
        config = config[part]
    return config


def fields_on_resume(rule: str) -> tuple[str, ...]:
    """The fields whose `on_resume` is `rule`."""
    return tuple(name for name, field in FIELDS.items() if field.on_resume == rule)


def with_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with the default of every field it lacks (one written before the field existed)."""
    config = ml_collections.ConfigDict(config)
    for name, field in FIELDS.items():
        if field.default is not _ABSENT and name not in config:
            config[name] = field.default
    return config


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
    """Raises errors.UserError naming the first field with an invalid value."""
    for name, field in FIELDS.items():
        if field.check is not None and not field.check(config, num_devices):
            expected = field.expected() if callable(field.expected) else field.expected
            raise errors.UserError(f"Invalid config.{name} = {_value(config, name)!r}: must be "
                                   f"{expected.format(num_devices=num_devices)}.",
                                   f"config.{name}")
