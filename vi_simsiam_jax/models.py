"""ResNet-18 backbone, SimSiam projector/predictor heads and the Siamese network (paper Sec. 5-6.2).

Follows flax examples/imagenet/models.py; the layout is torchvision's resnet18 without the fc layer,
and parameter names follow torchvision (conv1, bn1, layer1_0/conv1, ...), so torchvision weights
map one-to-one (kernels transposed OIHW -> HWIO).

The online network is g_psi = h_psi o f_phi (Sec. 5), f_phi = projector o backbone,
h_psi = predictor.
With kappa=True (VI-SimSiam; `methods.Method.kappa`) the predictor has one extra output, the raw
concentration, mapped to kappa > 0 by `kappa_from_raw` (Sec. 6.2: "we also add 1 dimension of the
output layer of the predictor").

Every BatchNorm takes `axis_name`, so under pmap/shard_map batch statistics are shared across
devices; parameter names and shapes never depend on the device count. Initialise with train=False
(no collective is needed then), train with train=True and mutable=["batch_stats"].

BatchNorm over views (`SiameseNet.bn_views`): "separate" (default) gives every view its own
statistics, as SimSiam's code and the PyTorch reference do by running each view as its own
forward pass; "joint" shares them among the same-size views (SwAV/DINO multi-crop). Either way
the convolutions run once on the concatenated same-size views; only `BatchNorm` differs.
"""

import functools
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vi_simsiam_jax.power_spherical import at_least_float32, l2_normalize

Array = jax.Array
ModuleDef = Any

STEMS = ("imagenet", "cifar")
KAPPA_MAPS = ("softplus", "exp")
TARGETS = ("stopgrad", "ema")
BN_VIEWS = ("separate", "joint")

# torchvision initialisations: kaiming_normal_(mode="fan_out", nonlinearity="relu") for convs,
# nn.Linear's default kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for linears.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
_DENSE_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm over `views` equal, consecutive slices of the batch.

    Training: each slice (one view) is normalised with its own mean and biased variance, taken
    over the slice and over the devices of `axis_name`, exactly as if each view were its own
    forward pass; the running averages are then updated once per view, in view order, as
    PyTorch's sequential passes do: r <- momentum r + (1 - momentum) s_v, the variance unbiased
    (n / (n - 1), n the view's values per channel over all devices), as PyTorch's. views=1 is an
    ordinary BatchNorm. Evaluation uses the running averages. Parameters and statistics have
    nn.BatchNorm's names (scale, bias; mean, var), in float32; statistics are computed in at
    least float32, the output in `dtype`.
    """

    use_running_average: bool
    views: int = 1
    momentum: float = 0.9  # flax convention: torch momentum 0.1
    epsilon: float = 1e-5
    use_scale: bool = True
    use_bias: bool = True
    scale_init: Callable[..., Array] = nn.initializers.ones_init()
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        channels = x.shape[-1]
        running_mean = self.variable("batch_stats", "mean", jnp.zeros, (channels,), jnp.float32)
        running_var = self.variable("batch_stats", "var", jnp.ones, (channels,), jnp.float32)
        # One float32 copy of x feeds both the statistics and the normalisation, so that the two
        # parts of x's gradient (which nearly cancel) are summed before rounding to a bfloat16 x.
        out_shape = x.shape
        x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        if self.use_running_average:
            mean, var = running_mean.value[None], running_var.value[None]
        else:
            if x.shape[0] % self.views:
                raise ValueError(f"batch of {x.shape[0]} does not split into {self.views} views.")
            slices = x.reshape(self.views, -1, channels)
            mean = jnp.mean(slices, axis=1)
            mean_square = jnp.mean(jnp.square(slices), axis=1)
            count = slices.shape[1]
            if self.axis_name:
                mean, mean_square = jax.lax.pmean((mean, mean_square), self.axis_name)
                count *= jax.lax.psum(1, self.axis_name)
            var = jnp.maximum(mean_square - jnp.square(mean), 0.0)
            if not self.is_initializing():
                new_mean, new_var = running_mean.value, running_var.value
                unbiased = var * count / max(count - 1, 1)
                for view in range(self.views):
                    new_mean = self.momentum * new_mean + (1.0 - self.momentum) * mean[view]
                    new_var = self.momentum * new_var + (1.0 - self.momentum) * unbiased[view]
                running_mean.value = new_mean.astype(running_mean.value.dtype)
                running_var.value = new_var.astype(running_var.value.dtype)
        multiplier = jax.lax.rsqrt(var + self.epsilon)
        if self.use_scale:
            multiplier = multiplier * self.param("scale", self.scale_init, (channels,),
                                                 jnp.float32)
        offset = -mean * multiplier
        if self.use_bias:
            offset = offset + self.param("bias", nn.initializers.zeros_init(), (channels,),
                                         jnp.float32)
        groups = mean.shape[0]
        y = x.reshape(groups, -1, channels) * multiplier[:, None] + offset[:, None]
        return y.reshape(out_shape).astype(self.dtype)


def _batch_norm(train: bool, axis_name: str | None, dtype: Any, views: int) -> ModuleDef:
    """torchvision BatchNorm defaults (torch momentum 0.1 == flax momentum 0.9)."""
    return functools.partial(BatchNorm, use_running_average=not train, views=views,
                             momentum=0.9, epsilon=1e-5, axis_name=axis_name, dtype=dtype)


def _pad(p: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((p, p), (p, p))


class BasicBlock(nn.Module):
    """torchvision BasicBlock: 3x3 conv-BN-ReLU, 3x3 conv-BN, (1x1/s conv-BN) shortcut, ReLU."""

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    zero_init_residual: bool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        s = (self.strides, self.strides)
        y = self.conv(self.features, (3, 3), strides=s, padding=_pad(1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv(self.features, (3, 3), strides=(1, 1), padding=_pad(1), name="conv2")(y)
        zero = self.zero_init_residual
        scale_init = nn.initializers.zeros_init() if zero else nn.initializers.ones_init()
        y = self.norm(scale_init=scale_init, name="bn2")(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = self.conv(self.features, (1, 1), strides=s, padding=_pad(0),
                          name="downsample_conv")(x)
            x = self.norm(name="downsample_bn")(x)
        return nn.relu(x + y)


class ResNet18(nn.Module):
    """ResNet-18 backbone (BasicBlock x [2, 2, 2, 2]); returns globally average-pooled features.

    stem="imagenet": 7x7/2 conv (pad 3)-BN-ReLU-3x3/2 max-pool (pad 1), as torchvision;
    stem="cifar": 3x3/1 conv (pad 1)-BN-ReLU, no pool (for 32-64 px inputs).
    width: channels of the first stage (stages are width * [1, 2, 4, 8]); 64 is ResNet-18, with
    11,176,512 parameters (imagenet stem). Output: (B, 8 * width).
    conv: the convolution module, injectable; it is called as
    conv(features, kernel_size, strides=, padding=((p, p), (p, p)), use_bias=False, dtype=,
    kernel_init=, name=) and must own a single "kernel" of shape (kh, kw, cin, cout), like nn.Conv.
    zero_init_residual: zero-initialise the last BN scale of each block (Goyal et al.; SimSiam).
    The call's `views`: how many views the batch concatenates, each with its own BN statistics.
    """

    stem: str = "imagenet"
    zero_init_residual: bool = False
    width: int = 64
    conv: ModuleDef = nn.Conv
    max_pool: Callable[..., Array] = nn.max_pool
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool, views: int = 1) -> Array:
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}.")
        conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype,
                                 kernel_init=_CONV_INIT)
        norm = _batch_norm(train, self.axis_name, self.dtype, views)
        if self.stem == "imagenet":
            x = conv(self.width, (7, 7), strides=(2, 2), padding=_pad(3), name="conv1")(x)
            x = nn.relu(norm(name="bn1")(x))
            x = self.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(1))
        else:
            x = conv(self.width, (3, 3), strides=(1, 1), padding=_pad(1), name="conv1")(x)
            x = nn.relu(norm(name="bn1")(x))
        for stage in range(4):
            for block in range(2):
                x = BasicBlock(features=self.width * 2**stage,
                               strides=2 if stage > 0 and block == 0 else 1,
                               conv=conv, norm=norm, zero_init_residual=self.zero_init_residual,
                               name=f"layer{stage + 1}_{block}")(x)
        return jnp.mean(x, axis=(1, 2))


class Projector(nn.Module):
    """SimSiam projector: Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN(no affine). No linear biases
    (each Linear is followed by BN, which cancels a bias)."""

    hidden_dim: int = 2048
    out_dim: int = 2048
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool, views: int = 1) -> Array:
        dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype,
                                  kernel_init=_DENSE_INIT)
        norm = _batch_norm(train, self.axis_name, self.dtype, views)
        x = nn.relu(norm(name="bn1")(dense(self.hidden_dim, name="fc1")(x)))
        x = nn.relu(norm(name="bn2")(dense(self.hidden_dim, name="fc2")(x)))
        return norm(use_scale=False, use_bias=False, name="bn3")(dense(self.out_dim, name="fc3")(x))


class Predictor(nn.Module):
    """SimSiam predictor: Linear(no bias)-BN-ReLU-Linear(with bias) to out_dim outputs."""

    hidden_dim: int = 512
    out_dim: int = 2048
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array, train: bool, views: int = 1) -> Array:
        x = nn.Dense(self.hidden_dim, use_bias=False, dtype=self.dtype, kernel_init=_DENSE_INIT,
                     name="fc1")(x)
        x = nn.relu(_batch_norm(train, self.axis_name, self.dtype, views)(name="bn1")(x))
        return nn.Dense(self.out_dim, dtype=self.dtype, kernel_init=_DENSE_INIT, name="fc2")(x)


def kappa_from_raw(raw: Array, kappa_map: str = "softplus", kappa_min: float = 1.0) -> Array:
    """Maps the predictor's raw concentration output to kappa >= kappa_min (>= float32).

    "softplus" (default): kappa = softplus(raw) + kappa_min. kappa grows at most linearly in the
    network output, so the kappa-weighted gradient of Eq. 12 on mu (which scales with kappa) cannot
    blow up; the floor (default 1, the "+1" of hyperspherical VAEs, Davidson et al. 2018) keeps the
    density away from the uniform kappa = 0, where mu would receive no gradient at all.
    "exp": kappa = exp(raw) + kappa_min, a log-scale parameterisation that reaches the large kappa
    (~ d cos / (1 - cos)) that a well-aligned pair favours faster, but can overflow for raw > 88.
    """
    raw = at_least_float32(raw)
    if kappa_map == "softplus":
        return jax.nn.softplus(raw) + kappa_min
    if kappa_map == "exp":
        return jnp.exp(raw) + kappa_min
    raise ValueError(f"kappa_map must be one of {KAPPA_MAPS}, got {kappa_map!r}.")


@flax.struct.dataclass
class SiameseOutput:
    """One view's outputs of SiameseNet, as the losses read them; leading batch dimension B.

    features: (B, 8 * width) backbone features (linear evaluation uses these).
    z: (B, dim) float32 projection f_phi(x), not normalised (BN output).
    mu: (B, dim) float32 unit-norm prediction (the mean direction of Eq. 11); None if predict=False.
    kappa: (B,) float32 concentration (SiameseNet.kappa only; None without it or predict=False).
    """

    features: Array
    z: Array
    mu: Array | None = None
    kappa: Array | None = None


class SiameseNet(nn.Module):
    """Backbone + projector (f_phi) + predictor (h_psi) for SimSiam or VI-SimSiam (Fig. 1, Alg. 1).

    kappa: the predictor outputs dim + 1 (mean direction, raw kappa; VI-SimSiam), else dim.
    Defaults follow SimSiam (dim 2048, projector hidden 2048, predictor hidden 512,
    zero_init_residual=True) with the paper's ResNet-18 backbone (Sec. 6.2).
    bn_views: "separate" (default, SimSiam's per-view BN statistics) or "joint" (shared by the
    same-size views); see `forward_views`. It changes no parameter.
    Parameter tree: {"backbone": ..., "projector": ..., "predictor": ...}.
    """

    kappa: bool = False
    stem: str = "imagenet"
    width: int = 64
    zero_init_residual: bool = True
    proj_hidden_dim: int = 2048
    dim: int = 2048
    pred_dim: int = 512
    kappa_map: str = "softplus"
    kappa_min: float = 1.0
    conv: ModuleDef = nn.Conv
    max_pool: Callable[..., Array] = nn.max_pool
    bn_views: str = "separate"
    axis_name: str | None = None
    dtype: Any = jnp.float32

    def setup(self) -> None:
        self.backbone = ResNet18(stem=self.stem, zero_init_residual=self.zero_init_residual,
                                 width=self.width, conv=self.conv, max_pool=self.max_pool,
                                 axis_name=self.axis_name,
                                 dtype=self.dtype)
        self.projector = Projector(hidden_dim=self.proj_hidden_dim, out_dim=self.dim,
                                   axis_name=self.axis_name, dtype=self.dtype)
        self.predictor = Predictor(hidden_dim=self.pred_dim, out_dim=self.dim + int(self.kappa),
                                   axis_name=self.axis_name, dtype=self.dtype)

    def __call__(self, images: Array, train: bool, predict: bool = True, views: int = 1
                 ) -> SiameseOutput:
        """A batch of images (B, H, W, C) of one crop size, the concatenation of `views` views
        (each with its own BN statistics). predict=False skips the predictor (target network)."""
        features = self.backbone(images, train, views)
        z = at_least_float32(self.projector(features, train, views))
        if not predict:
            return SiameseOutput(features=features, z=z)
        out = at_least_float32(self.predictor(z, train, views))
        mu = l2_normalize(out[:, :self.dim])
        kappa = (kappa_from_raw(out[:, self.dim], self.kappa_map, self.kappa_min) if self.kappa
                 else None)
        return SiameseOutput(features=features, z=z, mu=mu, kappa=kappa)

    def forward_views(self, views: Sequence[Array], train: bool, predict: bool = True
                      ) -> list[SiameseOutput]:
        """Runs a list of view batches (multi-crop: global views first) and returns one
        SiameseOutput per view, in order.

        Consecutive views of the same shape go through the network as one concatenated batch;
        with bn_views="separate" each keeps its own BatchNorm statistics and running-average
        update (what one forward pass per view gives, as in SimSiam's code), with "joint" they
        share them (SwAV/DINO multi-crop; one running-average update per crop size).
        """
        if self.bn_views not in BN_VIEWS:
            raise ValueError(f"bn_views must be one of {BN_VIEWS}, got {self.bn_views!r}.")
        groups: list[list[int]] = []
        for idx, view in enumerate(views):
            if groups and views[groups[-1][-1]].shape == view.shape:
                groups[-1].append(idx)
            else:
                groups.append([idx])
        outputs = []
        for group in groups:
            batch = jnp.concatenate([views[i] for i in group])
            out = self(batch, train, predict, len(group) if self.bn_views == "separate" else 1)
            start = 0
            for i in group:
                n = views[i].shape[0]
                outputs.append(jax.tree.map(lambda a, s=start, n=n: a[s:s + n], out))
                start += n
        return outputs


def ema_update(target_params: Any, online_params: Any, decay: float | Array) -> Any:
    """BYOL target update: target <- decay * target + (1 - decay) * online, leaf by leaf."""
    return jax.tree.map(lambda t, o: decay * t + (1.0 - decay) * o, target_params, online_params)


def target_projections(model: SiameseNet, online_outputs: Sequence[SiameseOutput],
                       global_views: Sequence[Array], train: bool, target: str = "stopgrad",
                       target_variables: Any = None) -> list[Array]:
    """Target projections f_phi(x_j) of the global views (the only targets with multi-crop).

    target="stopgrad" (SimSiam/VI-SimSiam): the online projections z of the first
    len(global_views) outputs, gradient stopped. target="ema" (BYOL/VI-BYOL): a forward pass of
    backbone + projector with target_variables (an EMA copy of the online variables, see
    `ema_update`); in train mode its BN uses batch statistics and its running averages are not
    updated. Either way the result carries no gradient; the losses also stop it themselves.
    """
    num_global = len(global_views)
    if target == "stopgrad":
        return [jax.lax.stop_gradient(o.z) for o in online_outputs[:num_global]]
    if target != "ema":
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}.")
    if target_variables is None:
        raise ValueError('target="ema" needs target_variables.')
    outputs = model.apply(target_variables, global_views, train, False,
                          method=SiameseNet.forward_views,
                          mutable=["batch_stats"] if train else False)
    if train:
        outputs, _ = outputs
    return [jax.lax.stop_gradient(o.z) for o in outputs]
