"""The method registry: look-up and its errors, and a toy method with a kappa output, registered
here, through pretraining, the linear probe and the kappa analysis, none of which names it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import reporting
from experiments.configs import probe as probe_config
from tests import pretrain_utils
from vi_simsiam_jax import losses, loop, methods, run_config
from vi_simsiam_jax.evaluation import kappa_report
from vi_simsiam_jax.power_spherical import l2_normalize

TOY = "toy_exponential_distance"


def _exponential_distance_loss(outputs, targets, reduction):
    """-log of an exponential density, rate kappa_i, of the distance 1 - cos(mu_i, z_j):
    kappa (1 - cos) - log kappa per pair, lowest at kappa = 1 / (1 - cos)."""
    i, j = losses.view_pairs(len(outputs), len(targets))
    mu = l2_normalize(jnp.stack([o.mu for o in outputs]))[i]
    z = l2_normalize(jax.lax.stop_gradient(jnp.stack(list(targets))))[j]
    kappa = jnp.stack([o.kappa for o in outputs])[i]
    cos = jnp.sum(mu * z, axis=-1)
    per_pair = jnp.mean(kappa * (1.0 - cos) - jnp.log(kappa), axis=1)
    loss = jnp.sum(per_pair) if reduction == "sum" else jnp.mean(per_pair)
    return loss, {"cosine": jnp.mean(cos), "kappa_mean": jnp.mean(kappa)}


@pytest.fixture
def toy_method():
    method = methods.register(methods.Method(TOY, "Toy", kappa=True,
                                             loss=_exponential_distance_loss, reduction="mean"))
    yield method
    del methods.REGISTRY[TOY]


def test_the_paper_methods_and_lookup_errors():
    assert (methods.get("simsiam").kappa, methods.get("simsiam").reduction) == (False, "mean")
    assert (methods.get("vi_simsiam").kappa, methods.get("vi_simsiam").reduction) == (True, "sum")
    assert methods.get("vi_simsiam").title == "VI-SimSiam"
    with pytest.raises(ValueError, match=r"Unknown method 'byol'.*\['simsiam', 'vi_simsiam'\]"):
        methods.get("byol")
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.get("simsiam"))


def test_a_registered_kappa_method_reaches_the_kappa_analysis(toy_method, pretrain_data,
                                                              tmp_path):
    workdir = str(tmp_path)
    loop.pretrain(pretrain_utils.config(pretrain_data, method=TOY, num_epochs=1), workdir)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged and all(np.isfinite(row["kappa_mean"]) for row in logged)

    config = run_config.load_config(workdir)
    kappa_report.check_kappa(config, workdir)
    probe = probe_config.get_config()
    probe.update(extract_batch_size=8, batch_size=16, num_epochs=2, lr_sweep=())
    frozen, _, result = reporting.fit_probe(workdir, probe)
    assert frozen.model.kappa and frozen.step == 4
    kappa = result.scored.kappa
    assert kappa.shape == (8,) and np.all(np.isfinite(kappa)) and np.all(kappa >= 1.0)
    summary = kappa_report.analyze(result, result.scored_examples.label_names, num_images=2)
    assert summary["num_val"] == 8 and summary["kappa"]["min"] == pytest.approx(kappa.min())
    assert len(summary["lowest_kappa"]) == len(summary["highest_kappa"]) == 2

    config.method = "simsiam"  # a method without kappa is refused, the toy named among those
    with pytest.raises(ValueError, match=f"kappa exists only for method='vi_simsiam' or '{TOY}'"):
        kappa_report.check_kappa(config, workdir)
