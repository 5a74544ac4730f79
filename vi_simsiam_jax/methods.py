"""The pretraining methods, each described once: what its predictor outputs, its loss and how
reports name it. config.method names one of REGISTRY.

- "simsiam" (SimSiam): the predictor outputs the prediction p; negative cosine (paper Eq. 1),
  mean over the view pairs.
- "vi_simsiam" (VI-SimSiam): the predictor has one extra output, the raw concentration, so the
  prediction is a power spherical distribution (mu, kappa) (Sec. 6.2); its negative
  log-likelihood (Eq. 12), summed over the view pairs.

The target network is not part of a method: config.target ("stopgrad" | "ema",
`models.target_projections`) is orthogonal to it. BYOL is method="simsiam" with target="ema",
VI-BYOL method="vi_simsiam" with target="ema".

A new method is one more `register(Method(...))` at the end of this module (so every entry point
knows it): training builds its predictor (`kappa`) and loss from here, and evaluation reads kappa
from every method that has it. This is the one module that tells methods apart by name.
"""

import dataclasses
from typing import Callable, Sequence

import jax

from vi_simsiam_jax import losses
from vi_simsiam_jax.models import SiameseOutput

Array = jax.Array
Loss = Callable[[Sequence[SiameseOutput], Sequence[Array], str],
                tuple[Array, dict[str, Array]]]


@dataclasses.dataclass(frozen=True)
class Method:
    """A pretraining method.

    name: config.method. title: its name in reports ("VI-SimSiam").
    kappa: the predictor has one extra output, the raw concentration (`models.SiameseNet.kappa`),
      so every view's output carries kappa, which the losses and evaluation read.
    loss: (per-view outputs, global-view target projections, reduction "mean" | "sum" over the
      view pairs) -> (loss, diagnostics); the diagnostics hold at least "cosine" (the loop
      logs it, and "kappa_mean" if present).
    reduction: the paper's reduction over the view pairs, "mean" or "sum".
    """

    name: str
    title: str
    kappa: bool
    loss: Loss
    reduction: str

    def loss_of(self, outputs: Sequence[SiameseOutput], targets: Sequence[Array],
                reduction: str = "paper") -> tuple[Array, dict[str, Array]]:
        """The loss over the pairs of views: reduction one of losses.REDUCTIONS, "paper" being
        this method's own. targets as from models.target_projections (global views only)."""
        if reduction not in losses.REDUCTIONS:
            raise ValueError(f"loss reduction must be one of {losses.REDUCTIONS}, "
                             f"got {reduction!r}.")
        return self.loss(outputs, targets, self.reduction if reduction == "paper" else reduction)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Adds `method` to REGISTRY under its name (ValueError if the name is taken)."""
    if method.name in REGISTRY:
        raise ValueError(f"A method named {method.name!r} is already registered.")
    REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method called `name`; ValueError listing the registered names if none."""
    if name not in REGISTRY:
        raise ValueError(f"Unknown method {name!r}: the registered methods are "
                         f"{sorted(REGISTRY)}.")
    return REGISTRY[name]


def _simsiam_loss(outputs: Sequence[SiameseOutput], targets: Sequence[Array], reduction: str
                  ) -> tuple[Array, dict[str, Array]]:
    return losses.simsiam_loss([o.mu for o in outputs], targets, reduction)


def _vi_simsiam_loss(outputs: Sequence[SiameseOutput], targets: Sequence[Array], reduction: str
                     ) -> tuple[Array, dict[str, Array]]:
    return losses.vi_simsiam_loss([o.mu for o in outputs], [o.kappa for o in outputs], targets,
                                  reduction)


register(Method("simsiam", "SimSiam", kappa=False, loss=_simsiam_loss, reduction="mean"))
register(Method("vi_simsiam", "VI-SimSiam", kappa=True, loss=_vi_simsiam_loss, reduction="sum"))
