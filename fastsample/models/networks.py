"""Flax NNX networks for the built-in data: a time-conditioned MLP and a small U-Net.

Both map ``(x, noise_label, cond) -> output`` with the shape of ``x``. ``noise_label`` is a scalar
or one value per sample (what the training objective feeds: ``log(sigma) / 4`` for EDM, ``t`` for
flow matching), embedded with sinusoidal features (Transformer position encoding, Vaswani et al.,
Attention Is All You Need, 2017; as in DDPM, Ho et al., 2020) of bounded frequency and a small MLP. With
``num_classes > 0`` the network is class-conditional: ``cond`` holds integer labels and the extra
label ``num_classes`` is the null class used for classifier-free guidance (Ho & Salimans,
Classifier-Free Diffusion Guidance, 2022); ``cond=None`` means the null class.

The output layer starts at zero (``zero_init=True``), so a fresh network outputs exactly zero.

:class:`NetworkFn` is the pure functional form (graph definition + parameters as a plain nested
dict of arrays) that training, checkpoints and :class:`~fastsample.Denoiser` use.
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["MLP", "UNet", "NETWORKS", "make_network", "NetworkFn", "sinusoidal_embedding"]


def sinusoidal_embedding(label, dim: int, max_freq: float = 32.0):
    """``(n, dim)`` features ``[cos(label * f_k), sin(label * f_k)]`` with frequencies ``f_k``
    spaced geometrically from ``1`` to ``max_freq`` (``k = 0 .. dim/2 - 1``), the Transformer's
    position encoding (Vaswani et al., 2017) for labels of order one (``log(sigma)/4``, ``t``).

    The highest frequency bounds how fast the network can vary with the noise level: smooth in
    ``t`` keeps the probability-flow ODE non-stiff for few-step and adaptive solvers alike."""
    if dim % 2:
        raise ValueError(f"the time embedding dimension must be even; got {dim}.")
    half = dim // 2
    freqs = jnp.exp(jnp.linspace(0.0, math.log(max_freq), half, dtype=label.dtype))
    arg = label[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(arg), jnp.sin(arg)], axis=-1)


def _check_positive(name: str, value) -> None:
    if int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {value!r}.")


class _Conditioning(nnx.Module):
    """Embedding of the noise label (sinusoidal features + 2-layer MLP), plus a class embedding
    (``num_classes + 1`` rows, the last one the null class) when ``num_classes > 0``."""

    def __init__(self, emb_dim: int, num_classes: int, *, rngs: nnx.Rngs):
        self.emb_dim = emb_dim
        self.num_classes = num_classes
        self.lin1 = _linear(emb_dim, emb_dim, rngs)
        self.lin2 = _linear(emb_dim, emb_dim, rngs)
        self.classes = (nnx.Embed(num_classes + 1, emb_dim, embedding_init=_KERNEL_INIT, rngs=rngs)
                        if num_classes > 0 else None)

    def __call__(self, label, cond, n: int, dtype):
        label = jnp.broadcast_to(jnp.asarray(label, dtype).reshape(-1), (n,))
        emb = self.lin2(jax.nn.silu(self.lin1(sinusoidal_embedding(label, self.emb_dim))))
        if self.classes is not None:
            if cond is None:
                cond = jnp.full((n,), self.num_classes, jnp.int32)
            emb = emb + self.classes(jnp.broadcast_to(jnp.asarray(cond, jnp.int32).reshape(-1), (n,)))
        elif cond is not None:
            raise ValueError("this network is unconditional (num_classes=0) but got a `cond`.")
        return emb


#: LeCun-uniform weights (variance ``1 / fan_in``): normal draws (flax's truncated-normal default
#: included) go through an inverse erf whose XLA compile dominates building a small network on CPU.
_KERNEL_INIT = nnx.initializers.variance_scaling(1.0, "fan_in", "uniform")


def _linear(n_in: int, n_out: int, rngs: nnx.Rngs, zero: bool = False) -> nnx.Linear:
    init = nnx.initializers.zeros_init() if zero else _KERNEL_INIT
    return nnx.Linear(n_in, n_out, kernel_init=init, rngs=rngs)


def _conv(c_in: int, c_out: int, rngs: nnx.Rngs, kernel=(3, 3), strides=1, zero: bool = False) -> nnx.Conv:
    init = nnx.initializers.zeros_init() if zero else _KERNEL_INIT
    return nnx.Conv(c_in, c_out, kernel, strides=strides, kernel_init=init, rngs=rngs)


class _ResBlock(nnx.Module):
    """Pre-norm residual MLP block with the conditioning added after the first layer."""

    def __init__(self, width: int, emb_dim: int, *, rngs: nnx.Rngs):
        self.norm = nnx.LayerNorm(width, rngs=rngs)
        self.lin1 = _linear(width, width, rngs)
        self.emb = _linear(emb_dim, width, rngs)
        self.lin2 = _linear(width, width, rngs)

    def __call__(self, h, emb):
        z = self.lin1(jax.nn.silu(self.norm(h))) + self.emb(jax.nn.silu(emb))
        return h + self.lin2(jax.nn.silu(z))


class MLP(nnx.Module):
    """Time-conditioned residual MLP for flat data ``(n, dim)`` (2-D toys, 64-D digits).

    Arguments:
        dim: data dimension.
        hidden: width of the residual blocks.
        depth: number of residual blocks.
        emb_dim: width of the noise-label / class embedding.
        num_classes: ``0`` for an unconditional network, else the number of classes (plus a null class).
        zero_init: start the output layer at zero.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, emb_dim: int = 64, num_classes: int = 0,
                 zero_init: bool = True, *, rngs: nnx.Rngs):
        for name, value in (("dim", dim), ("hidden", hidden), ("depth", depth), ("emb_dim", emb_dim)):
            _check_positive(name, value)
        self.dim = dim
        self.cond = _Conditioning(emb_dim, num_classes, rngs=rngs)
        self.inp = _linear(dim, hidden, rngs)
        self.blocks = nnx.List([_ResBlock(hidden, emb_dim, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.out = _linear(hidden, dim, rngs, zero=zero_init)

    def __call__(self, x, label, cond=None):
        n = x.shape[0]
        h = x.reshape(n, -1)
        if h.shape[1] != self.dim:
            raise ValueError(f"MLP built for dimension {self.dim}; got x of shape {x.shape}.")
        emb = self.cond(label, cond, n, x.dtype)
        h = self.inp(h)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(jax.nn.silu(self.norm(h))).reshape(x.shape)


def _groups(c: int) -> int:
    return math.gcd(c, 8)


class _ConvBlock(nnx.Module):
    """Residual conv block (GroupNorm, SiLU, 3x3 conv, conditioning as a per-channel bias)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.GroupNorm(c_in, num_groups=_groups(c_in), rngs=rngs)
        self.conv1 = _conv(c_in, c_out, rngs)
        self.emb = _linear(emb_dim, c_out, rngs)
        self.norm2 = nnx.GroupNorm(c_out, num_groups=_groups(c_out), rngs=rngs)
        self.conv2 = _conv(c_out, c_out, rngs)
        self.skip = _conv(c_in, c_out, rngs, kernel=(1, 1)) if c_in != c_out else None

    def __call__(self, h, emb):
        z = self.conv1(jax.nn.silu(self.norm1(h)))
        z = z + self.emb(jax.nn.silu(emb))[:, None, None, :]
        z = self.conv2(jax.nn.silu(self.norm2(z)))
        return (h if self.skip is None else self.skip(h)) + z


class UNet(nnx.Module):
    """Small U-Net for ``H x W x C`` images (default 8x8x1 digits; a flat ``(n, H*W*C)`` input is
    reshaped and the output has the input's shape). One residual block per level, stride-2
    convolutions down, nearest-neighbour upsampling up, skip connections by concatenation
    (Ronneberger et al., U-Net, 2015; the DDPM variant, Ho et al., 2020).

    Arguments:
        image_shape: ``(H, W, C)``; ``H`` and ``W`` divisible by ``2 ** (len(channels) - 1)``.
        channels: channels per resolution level.
        emb_dim, num_classes, zero_init: as in :class:`MLP`.
    """

    def __init__(self, image_shape=(8, 8, 1), channels=(32, 64), emb_dim: int = 64, num_classes: int = 0,
                 zero_init: bool = True, *, rngs: nnx.Rngs):
        image_shape, channels = tuple(int(s) for s in image_shape), tuple(int(c) for c in channels)
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (H, W, C) with positive sizes; got {image_shape}.")
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty list of positive integers; got {channels}.")
        f = 2 ** (len(channels) - 1)
        if image_shape[0] % f or image_shape[1] % f:
            raise ValueError(f"image_shape {image_shape[:2]} must be divisible by {f} for {len(channels)} levels.")
        self.image_shape = image_shape
        c_img = image_shape[2]
        self.cond = _Conditioning(emb_dim, num_classes, rngs=rngs)
        self.inp = _conv(c_img, channels[0], rngs)
        self.down_blocks = nnx.List()
        self.downsample = nnx.List()
        for i, c in enumerate(channels):
            self.down_blocks.append(_ConvBlock(channels[max(i - 1, 0)], c, emb_dim, rngs=rngs))
            if i < len(channels) - 1:
                self.downsample.append(_conv(c, c, rngs, strides=2))
        self.mid = _ConvBlock(channels[-1], channels[-1], emb_dim, rngs=rngs)
        self.up_blocks = nnx.List()
        self.upsample = nnx.List()
        for i in reversed(range(len(channels))):
            c_below = channels[-1] if i == len(channels) - 1 else channels[i + 1]
            self.up_blocks.append(_ConvBlock(c_below + channels[i], channels[i], emb_dim, rngs=rngs))
            if i > 0:
                self.upsample.append(_conv(channels[i], channels[i], rngs))
        self.norm = nnx.GroupNorm(channels[0], num_groups=_groups(channels[0]), rngs=rngs)
        self.out = _conv(channels[0], c_img, rngs, zero=zero_init)

    @property
    def dim(self) -> int:
        return math.prod(self.image_shape)

    def __call__(self, x, label, cond=None):
        n = x.shape[0]
        if math.prod(x.shape[1:]) != self.dim:
            raise ValueError(f"UNet built for images {self.image_shape}; got x of shape {x.shape}.")
        emb = self.cond(label, cond, n, x.dtype)
        h = self.inp(x.reshape((n, *self.image_shape)))
        skips = []
        for i, block in enumerate(self.down_blocks):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid(h, emb)
        for j, block in enumerate(self.up_blocks):
            h = block(jnp.concatenate([h, skips.pop()], axis=-1), emb)
            if j < len(self.upsample):
                h = self.upsample[j](jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))
        return self.out(jax.nn.silu(self.norm(h))).reshape(x.shape)


#: Network kinds by name: ``NETWORKS[kind](dim=..., **options, rngs=...)``.
NETWORKS = {"mlp": MLP, "unet": UNet}


def _build(kind: str, dim: int, seed: int, options: dict) -> nnx.Module:
    rngs = nnx.Rngs(seed)
    if kind == "mlp":
        return MLP(dim, **options, rngs=rngs)
    net = UNet(**options, rngs=rngs)
    if net.dim != dim:
        raise ValueError(f"unet image_shape {net.image_shape} has {net.dim} values; the data has dimension {dim}.")
    return net


def make_network(kind: str, dim: int, seed: int = 0, **options) -> nnx.Module:
    """Build the network ``kind`` (``"mlp"`` or ``"unet"``) for ``dim``-dimensional data, its
    parameters initialised from ``seed``. For ``"unet"``, ``dim`` must equal the image size.

    The parameters are drawn by one jitted program (not one dispatch per weight), after
    ``nnx.eval_shape`` has checked the options."""
    if kind not in NETWORKS:
        raise ValueError(f"unknown network kind {kind!r}; allowed: {', '.join(NETWORKS)}.")
    abstract = nnx.eval_shape(lambda: _build(kind, dim, seed, options))
    graphdef, _ = nnx.split(abstract)
    state = jax.jit(lambda: nnx.state(_build(kind, dim, seed, options)))()
    return nnx.merge(graphdef, state)


class NetworkFn(eqx.Module):
    """A Flax NNX network as a pure function ``(params, x, label, cond)``: the graph definition is
    static, the parameters are a nested dict of arrays (``nnx.to_pure_dict``), so the object is a
    JAX pytree that ``jit``, ``optax`` and orbax handle directly.

    ``apply`` runs the network in the dtype of ``x`` (float32 parameters are cast to float64 for a
    float64 reference solve)."""

    graphdef: Any = eqx.field(static=True)
    params: dict

    @classmethod
    def from_module(cls, module: nnx.Module) -> NetworkFn:
        graphdef, state = nnx.split(module)
        return cls(graphdef, nnx.to_pure_dict(state))

    def apply(self, params, x, label, cond=None):
        params = jax.tree.map(lambda p: p.astype(x.dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p, params)
        return nnx.merge(self.graphdef, params)(x, label, cond)

    def __call__(self, x, label, cond=None):
        return self.apply(self.params, x, label, cond)

    def replace(self, params) -> NetworkFn:
        return NetworkFn(self.graphdef, params)
