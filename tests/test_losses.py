"""SimSiam (Eq. 1) and VI-SimSiam (Eq. 12) losses: references, stop-gradient, symmetry,
constant-kappa reduction, kappa gradients, degenerate inputs, multi-crop targets, diagnostics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import reference
from tests.reference import unit
from vi_simsiam_jax import losses, methods, models
from vi_simsiam_jax import power_spherical as ps

# Jitted: one small compile per shape instead of one per op (eager); validation runs at trace time.
_vi_loss = jax.jit(losses.vi_simsiam_loss, static_argnames="reduction")
_ss_loss = jax.jit(losses.simsiam_loss, static_argnames="reduction")


def _views(num_views: int, batch: int, dim: int, seed: int = 0):
    """Random predictions, kappas in [1, 50] and projections correlated with the predictions."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(batch, dim))
    mus = [jnp.asarray(base + 0.7 * rng.normal(size=(batch, dim)), jnp.float32)
           for _ in range(num_views)]
    kappas = [jnp.asarray(rng.uniform(1.0, 50.0, size=batch), jnp.float32)
              for _ in range(num_views)]
    zs = [jnp.asarray(base + 0.7 * rng.normal(size=(batch, dim)), jnp.float32)
          for _ in range(num_views)]
    return mus, kappas, zs


def _ps_log_prob(x: np.ndarray, mu: np.ndarray, kappa: np.ndarray) -> np.ndarray:
    """The float64 reference PS log density of x's direction under mu's direction."""
    return reference.power_spherical_log_prob(unit(x), unit(mu), kappa)


def _cos(a, b) -> np.ndarray:
    return np.sum(unit(np.asarray(a, np.float64)) * unit(np.asarray(b, np.float64)), axis=-1)


def test_two_view_losses_match_references():
    mus, kappas, zs = _views(2, batch=6, dim=16)
    loss, _ = _ss_loss(mus, zs)
    # SimSiam: L = D(p1, z2) / 2 + D(p2, z1) / 2, D = -cos averaged over the batch.
    expected = -0.5 * (_cos(mus[0], zs[1]).mean() + _cos(mus[1], zs[0]).mean())
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    loss, _ = _vi_loss(mus, kappas, zs)
    # Alg. 1: L = -p1.log_prob(z2) - p2.log_prob(z1); L.mean(). "mean" over pairs halves it.
    m, k, z = (np.asarray(a, np.float64) for a in (mus, kappas, zs))
    alg1 = -_ps_log_prob(z[1], m[0], k[0]) - _ps_log_prob(z[0], m[1], k[1])
    np.testing.assert_allclose(loss, alg1.mean(), rtol=1e-5)
    np.testing.assert_allclose(_vi_loss(mus, kappas, zs, reduction="mean")[0], alg1.mean() / 2,
                               rtol=1e-5)


def test_multi_view_loss_reductions_over_pairs():
    """Eq. 12 sums VI-SimSiam's P = 2 (5 - 1) pairs; SimSiam averages them; either can be
    forced, also through methods.Method.loss_of's reduction."""
    mus, kappas, zs = _views(5, batch=3, dim=8, seed=1)
    targets = zs[:2]
    m, k, z = (np.asarray(a, np.float64) for a in (mus, kappas, targets))
    vi_terms = [-_ps_log_prob(z[j], m[i], k[i]).mean()
                for j in range(2) for i in range(5) if i != j]
    ss_terms = [-_cos(m[i], z[j]).mean() for j in range(2) for i in range(5) if i != j]
    assert len(vi_terms) == 2 * (5 - 1)
    np.testing.assert_allclose(_vi_loss(mus, kappas, targets)[0], np.sum(vi_terms), rtol=1e-5)
    np.testing.assert_allclose(_vi_loss(mus, kappas, targets, reduction="mean")[0],
                               np.mean(vi_terms), rtol=1e-5)
    np.testing.assert_allclose(_ss_loss(mus, targets)[0], np.mean(ss_terms), rtol=1e-5)
    np.testing.assert_allclose(_ss_loss(mus, targets, reduction="sum")[0], np.sum(ss_terms),
                               rtol=1e-5)
    outputs = [models.SiameseOutput(features=mu, z=mu, mu=mu, kappa=kappa)
               for mu, kappa in zip(mus, kappas)]
    for method, terms, paper in (("vi_simsiam", vi_terms, np.sum(vi_terms)),
                                 ("simsiam", ss_terms, np.mean(ss_terms))):
        for reduction, expected in (("mean", np.mean(terms)), ("sum", np.sum(terms)),
                                    ("paper", paper)):
            loss, _ = methods.get(method).loss_of(outputs, targets, reduction)
            np.testing.assert_allclose(loss, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        methods.get("simsiam").loss_of(outputs, targets, "max")


def test_view_pairs():
    i, j = losses.view_pairs(5, 2)
    assert sorted(zip(i.tolist(), j.tolist())) == sorted(
        (a, b) for b in range(2) for a in range(5) if a != b)
    for bad in [(1, 1), (3, 0), (2, 3)]:
        with pytest.raises(ValueError):
            losses.view_pairs(*bad)


def test_no_gradient_reaches_targets():
    mus, kappas, zs = _views(4, batch=5, dim=8, seed=2)
    targets = jnp.stack(zs[:2])
    g_simsiam = jax.jit(jax.grad(lambda t: _ss_loss(mus, t)[0]))(targets)
    g_vi = jax.jit(jax.grad(lambda t: _vi_loss(mus, kappas, t)[0]))(targets)
    np.testing.assert_array_equal(g_simsiam, 0.0)
    np.testing.assert_array_equal(g_vi, 0.0)
    # The predictions and kappas do receive gradients.
    g_mu, g_kappa = jax.jit(jax.grad(lambda m, k: _vi_loss(m, k, targets)[0],
                                     argnums=(0, 1)))(mus, kappas)
    assert all(float(jnp.abs(g).max()) > 0 for g in g_mu + g_kappa)


def test_losses_symmetric_under_view_permutations():
    mus, kappas, zs = _views(5, batch=4, dim=8, seed=3)
    num_global = 3
    base_vi, _ = _vi_loss(mus, kappas, zs[:num_global])
    base_ss, _ = _ss_loss(mus, zs[:num_global])
    for perm in ([2, 0, 1, 3, 4], [1, 0, 2, 4, 3], [0, 2, 1, 4, 3]):
        pm = [mus[p] for p in perm]
        pk = [kappas[p] for p in perm]
        pz = [zs[p] for p in perm[:num_global]]
        np.testing.assert_allclose(_vi_loss(pm, pk, pz)[0], base_vi, rtol=1e-6)
        np.testing.assert_allclose(_ss_loss(pm, pz)[0], base_ss, rtol=1e-6)
    # Swapping two views' targets only (not their predictions) does change the loss.
    swapped = [zs[1], zs[0], zs[2]]
    assert abs(float(_vi_loss(mus, kappas, swapped)[0] - base_vi)) > 1e-3


@pytest.mark.parametrize("kappa", [1.0, 7.5, 300.0])
def test_constant_kappa_reduces_to_cosine_objective(kappa):
    """With kappa constant, Eq. 12 = -log C(kappa) - kappa * mean log(1 + cos): affine in the
    summed log(1 + cos) with slope -kappa (the PS form of Eq. 9), constant independent of mu, z."""
    dim = 32
    losses_and_sums = []
    for seed in range(3):
        mus, _, zs = _views(3, batch=4, dim=dim, seed=10 + seed)
        kappas = [jnp.full((4,), kappa, jnp.float32)] * 3
        loss, _ = _vi_loss(mus, kappas, zs[:2], reduction="mean")
        mean_log1p = np.mean([np.log1p(_cos(mus[i], zs[j]))
                              for j in range(2) for i in range(3) if i != j])
        losses_and_sums.append((float(loss), mean_log1p))
    const = [loss + kappa * s for loss, s in losses_and_sums]
    np.testing.assert_allclose(const, const[0], rtol=1e-5, atol=1e-4 * kappa)
    neg_log_c = -reference.power_spherical_log_normalizer(kappa, dim)
    np.testing.assert_allclose(const[0], neg_log_c, rtol=1e-5)
    # The gradient w.r.t. the predictions is that of -kappa * mean log(1 + cos) (C is mu-free).
    mus, _, zs = _views(3, batch=4, dim=dim, seed=20)
    kappas = [jnp.full((4,), kappa, jnp.float32)] * 3

    def cosine_objective(m):
        m = [ps.l2_normalize(a) for a in m]
        z = [ps.l2_normalize(a) for a in zs[:2]]
        return -kappa * jnp.mean(jnp.stack([jnp.log1p(jnp.sum(m[i] * z[j], -1))
                                            for j in range(2) for i in range(3) if i != j]))

    g_loss = jax.jit(jax.grad(lambda m: _vi_loss(m, kappas, zs[:2], reduction="mean")[0]))(mus)
    g_ref = jax.jit(jax.grad(cosine_objective))(mus)
    for a, b_ in zip(g_loss, g_ref):
        np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-6 * kappa)


def test_mismatched_pair_gets_gradient_lowering_its_kappa():
    """Two examples share kappa; example 0's views agree, example 1's disagree. dL/dkappa is the
    PS expectation of log(1 + t) minus log(1 + cos), larger (and positive) for the mismatch."""
    dim = 16
    rng = np.random.default_rng(4)
    base = unit(rng.normal(size=(2, dim)))
    far = unit(-base[1] + 0.3 * rng.normal(size=dim))  # cos ~ -0.9
    z1 = jnp.asarray(np.stack([unit(base[0] + 0.05 * rng.normal(size=dim)), far]), jnp.float32)
    mus = [jnp.asarray(base, jnp.float32)] * 2
    zs = [jnp.asarray(base, jnp.float32), z1]
    raw = jnp.zeros((2, 2))  # kappa = softplus(0) + 1 for every view and example

    def loss_of_raw(r):
        kappas = [models.kappa_from_raw(r[v]) for v in range(2)]
        return _vi_loss(mus, kappas, zs)[0]

    g = jax.jit(jax.grad(loss_of_raw))(raw)
    # View 0 predicts view 1's target: the mismatched example 1 must push its kappa down.
    assert float(g[0, 1]) > 0.0
    assert float(g[0, 1]) > float(g[0, 0])
    stepped = raw - 1.0 * g
    k_before = models.kappa_from_raw(raw[0])
    k_after = models.kappa_from_raw(stepped[0])
    assert float(k_after[1]) < float(k_before[1])
    assert float(k_after[1] - k_before[1]) < float(k_after[0] - k_before[0])
    assert float(loss_of_raw(stepped)) < float(loss_of_raw(raw))
    # Directly in kappa: positive derivative for the mismatched pair at a high concentration too.
    kappas = [jnp.full((2,), 40.0)] * 2
    g_k = jax.jit(jax.grad(lambda k: _vi_loss(mus, k, zs)[0]))(kappas)
    assert float(g_k[0][1]) > 0.0 > float(g_k[0][0])


def test_finite_for_collapsed_inputs_and_minimal_kappa():
    batch, dim = 4, 32
    same = jnp.ones((batch, dim))
    mus, zs = [same] * 3, [same] * 2
    kappa_min = [models.kappa_from_raw(jnp.full((batch,), -1e4))] * 3
    np.testing.assert_array_equal(kappa_min[0], 1.0)
    cases = {
        "collapsed": (mus, zs),
        "antipodal": ([-same] * 3, zs),  # 1 + cos = 0: density zero, clamped
        "zero_vectors": ([jnp.zeros((batch, dim))] * 3, [jnp.zeros((batch, dim))] * 2),
        "random": _views(3, batch, dim, seed=5)[::2],
    }
    vi_value_and_grad = jax.jit(jax.value_and_grad(losses.vi_simsiam_loss, argnums=(0, 1),
                                                   has_aux=True))
    ss_value_and_grad = jax.jit(jax.value_and_grad(losses.simsiam_loss, has_aux=True))
    for name, (m, z) in cases.items():
        for kappa in (kappa_min, [jnp.full((batch,), 1e4)] * 3):
            (loss, metrics), grads = vi_value_and_grad(m, kappa, z)
            assert np.isfinite(float(loss)), name
            assert all(np.isfinite(float(v)) for v in metrics.values()), name
            assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads)), name
        (loss, metrics), g = ss_value_and_grad(m, z)
        assert np.isfinite(float(loss)) and all(bool(jnp.all(jnp.isfinite(a))) for a in g), name
    _, metrics = _ss_loss(mus, zs)
    assert float(metrics["z_std"]) == 0.0 and float(metrics["cosine"]) == pytest.approx(1.0)


def test_local_views_are_never_targets():
    """Only the first G (global) views are targets: local projections cannot change the loss,
    while local predictions and global projections do."""
    mus, kappas, zs = _views(5, batch=3, dim=8, seed=6)
    outputs = [models.SiameseOutput(features=z, z=z, mu=m, kappa=k)
               for m, k, z in zip(mus, kappas, zs)]

    def loss(outs, method):
        targets = models.target_projections(None, outs, [None, None], train=True)
        assert len(targets) == 2
        return float(methods.get(method).loss_of(outs, targets)[0])

    changed_local_z = [o.replace(z=-3.0 * o.z) if v >= 2 else o for v, o in enumerate(outputs)]
    changed_local_mu = [o.replace(mu=-o.mu) if v >= 2 else o for v, o in enumerate(outputs)]
    changed_global_z = [o.replace(z=-o.z) if v == 1 else o for v, o in enumerate(outputs)]
    for method in ("simsiam", "vi_simsiam"):
        base = loss(outputs, method)
        assert loss(changed_local_z, method) == base
        assert abs(loss(changed_local_mu, method) - base) > 1e-3
        assert abs(loss(changed_global_z, method) - base) > 1e-3


def test_diagnostics():
    rng = np.random.default_rng(7)
    batch, dim = 512, 128
    zs = [jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32) for _ in range(2)]
    mus = [zs[1] + 0.5 * jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32), zs[0]]
    kappas = [jnp.asarray(rng.uniform(1, 10, batch), jnp.float32) for _ in range(2)]
    _, m = _vi_loss(mus, kappas, zs)
    assert set(m) == {"cosine", "z_std", "kappa_mean", "kappa_min", "kappa_max", "kappa_std"}
    assert float(m["z_std"]) == pytest.approx(1.0, abs=0.05)  # well-spread projections
    expected_cos = 0.5 * (_cos(mus[0], zs[1]).mean() + _cos(mus[1], zs[0]).mean())
    np.testing.assert_allclose(m["cosine"], expected_cos, rtol=1e-5)
    k = np.concatenate([np.asarray(a) for a in kappas])
    np.testing.assert_allclose([m["kappa_mean"], m["kappa_min"], m["kappa_max"], m["kappa_std"]],
                               [k.mean(), k.min(), k.max(), k.std()], rtol=1e-5)
    _, m = _ss_loss(mus, zs)
    assert set(m) == {"cosine", "z_std"}
    # Partial collapse: projections confined to a 4-dimensional subspace lower the monitor.
    low_rank = [jnp.pad(z[:, :4], ((0, 0), (0, dim - 4))) for z in zs]
    assert float(_ss_loss(mus, low_rank)[1]["z_std"]) < 0.3


def test_shape_validation():
    mus, kappas, zs = _views(2, batch=3, dim=8)
    with pytest.raises(AssertionError):  # kappa must be (B,), not (B, 1)
        losses.vi_simsiam_loss(mus, [k[:, None] for k in kappas], zs)
    with pytest.raises(AssertionError):
        losses.simsiam_loss(mus, [z[:, :4] for z in zs])
