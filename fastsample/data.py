"""Small built-in data sets: 2-D toy distributions and scikit-learn's 8x8 digits.

Every generator is deterministic given its seed. The 2-D toys take ``key_or_seed`` (an ``int``
seed or a JAX PRNG key), return an ``(n, 2)`` JAX array in the default float dtype and are
rescaled by fixed constants (never by the sample's own statistics) so that each coordinate has
roughly zero mean and unit scale; the exact scaling is stated in each docstring.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["moons", "eight_gaussians", "checkerboard", "swiss_roll", "rings", "digits", "TOYS", "load"]


def _key(key_or_seed):
    if isinstance(key_or_seed, (int, np.integer)):
        return jax.random.PRNGKey(int(key_or_seed))
    return key_or_seed


def _dtype():
    return jnp.result_type(float)


def _check_n(n):
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer; got {n!r}")
    return int(n)


def moons(key_or_seed, n: int, noise: float = 0.05):
    """Two interleaving half circles (as ``sklearn.datasets.make_moons``) plus Gaussian noise.

    Raw points: upper moon ``(cos th, sin th)``, lower moon ``(1 - cos th, 0.5 - sin th)``,
    ``th ~ U[0, pi]``, each point on either moon with probability 1/2, then ``noise``-std noise.
    Scaling: ``(x - (0.5, 0.25)) / (0.87, 0.5)`` (roughly unit standard deviation per axis).
    """
    n = _check_n(n)
    k_side, k_th, k_eps = jax.random.split(_key(key_or_seed), 3)
    dtype = _dtype()
    th = jax.random.uniform(k_th, (n,), dtype, 0.0, math.pi)
    lower = jax.random.bernoulli(k_side, 0.5, (n,))
    upper_pts = jnp.stack([jnp.cos(th), jnp.sin(th)], axis=1)
    lower_pts = jnp.stack([1.0 - jnp.cos(th), 0.5 - jnp.sin(th)], axis=1)
    x = jnp.where(lower[:, None], lower_pts, upper_pts)
    x = x + noise * jax.random.normal(k_eps, (n, 2), dtype)
    return (x - jnp.asarray([0.5, 0.25], dtype)) / jnp.asarray([0.87, 0.5], dtype)


def eight_gaussians(key_or_seed, n: int, radius: float = 2.0, std: float = 0.1):
    """Eight equally weighted Gaussians of standard deviation ``std`` on a circle of ``radius``.

    Scaling: everything is divided by ``radius / sqrt(2)`` (the per-axis standard deviation of the
    centres), so the centres lie on a circle of radius ``sqrt(2)`` and the noise has standard
    deviation ``std * sqrt(2) / radius``.
    """
    n = _check_n(n)
    k_comp, k_eps = jax.random.split(_key(key_or_seed))
    dtype = _dtype()
    comp = jax.random.randint(k_comp, (n,), 0, 8)
    angles = 2.0 * math.pi * comp.astype(dtype) / 8.0
    centres = radius * jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=1)
    x = centres + std * jax.random.normal(k_eps, (n, 2), dtype)
    return x / (radius / math.sqrt(2.0))


def checkerboard(key_or_seed, n: int):
    """Uniform density on the black squares of a 4x4 checkerboard covering ``[-2, 2]^2``.

    Scaling: none beyond the board itself, ``[-2, 2]^2`` (per-axis standard deviation ``2/sqrt(3)``,
    about 1.15).
    """
    n = _check_n(n)
    k1, k2, k3 = jax.random.split(_key(key_or_seed), 3)
    dtype = _dtype()
    x1 = jax.random.uniform(k1, (n,), dtype, -2.0, 2.0)
    # Column floor(x1) (in -2..1); the black squares of that column have rows of the other parity.
    parity = jnp.mod(jnp.floor(x1), 2.0)
    row = 2.0 * jax.random.randint(k2, (n,), 0, 2).astype(dtype) - 2.0 + jnp.mod(parity + 1.0, 2.0)
    x2 = row + jax.random.uniform(k3, (n,), dtype)
    return jnp.stack([x1, x2], axis=1)


def swiss_roll(key_or_seed, n: int, noise: float = 0.1):
    """2-D Swiss roll: ``t (cos t, sin t)`` with ``t = 1.5 pi (1 + 2 u)``, ``u ~ U[0, 1]``,
    plus ``noise``-std Gaussian noise (before scaling), as ``sklearn.datasets.make_swiss_roll``.

    Scaling: divided by 7.5 (per-axis standard deviation about 0.9).
    """
    n = _check_n(n)
    k_t, k_eps = jax.random.split(_key(key_or_seed))
    dtype = _dtype()
    t = 1.5 * math.pi * (1.0 + 2.0 * jax.random.uniform(k_t, (n,), dtype))
    x = jnp.stack([t * jnp.cos(t), t * jnp.sin(t)], axis=1)
    x = x + noise * jax.random.normal(k_eps, (n, 2), dtype)
    return x / 7.5


def rings(key_or_seed, n: int, num_rings: int = 2, noise: float = 0.05):
    """Concentric circles of radii ``1, 2, ..., num_rings`` (each point on a uniformly chosen ring,
    uniform angle) plus ``noise``-std Gaussian noise (after scaling).

    Scaling: radii multiplied by ``sqrt(2 / mean(r_k^2))``, which gives unit per-axis variance
    before the noise.
    """
    n = _check_n(n)
    if int(num_rings) != num_rings or num_rings < 1:
        raise ValueError(f"num_rings must be a positive integer; got {num_rings!r}")
    k_ring, k_th, k_eps = jax.random.split(_key(key_or_seed), 3)
    dtype = _dtype()
    radii = np.arange(1, num_rings + 1, dtype=np.float64)
    scale = math.sqrt(2.0 / float(np.mean(radii**2)))
    r = (jax.random.randint(k_ring, (n,), 0, num_rings) + 1).astype(dtype) * scale
    th = jax.random.uniform(k_th, (n,), dtype, 0.0, 2.0 * math.pi)
    x = r[:, None] * jnp.stack([jnp.cos(th), jnp.sin(th)], axis=1)
    return x + noise * jax.random.normal(k_eps, (n, 2), dtype)


def digits(split: str = "train", seed: int = 0, test_fraction: float = 0.2):
    """scikit-learn's 8x8 digits (1797 images), pixels scaled to ``[-1, 1]`` by ``x / 8 - 1``.

    The train / held-out split is a random permutation fixed by ``seed``: the first
    ``round(test_fraction * 1797)`` permuted indices are ``"test"``, the rest ``"train"``; the two
    are disjoint and together cover every image. ``"all"`` returns every image in the original order.

    Returns:
        ``(x, labels)``: NumPy arrays, ``x`` float64 of shape ``(n, 64)``, ``labels`` int of shape ``(n,)``.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all'; got {split!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction!r}")
    d = load_digits()
    x = d.data.astype(np.float64) / 8.0 - 1.0
    y = d.target.astype(np.int64)
    if split == "all":
        return x, y
    perm = np.random.default_rng(seed).permutation(x.shape[0])
    n_test = int(round(test_fraction * x.shape[0]))
    idx = perm[:n_test] if split == "test" else perm[n_test:]
    return x[idx], y[idx]


#: The 2-D toy generators by name: ``TOYS[name](key_or_seed, n) -> (n, 2)``.
TOYS = {
    "moons": moons,
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
    "swiss_roll": swiss_roll,
    "rings": rings,
}


def load(name: str, n: int, seed: int = 0, **options):
    """``n`` samples of the toy ``name`` (see :data:`TOYS`) drawn with ``seed``; ``options`` go to
    the generator. Raises ``ValueError`` naming the known toys for an unknown name."""
    if name not in TOYS:
        raise ValueError(f"unknown toy data set {name!r}; known: {', '.join(sorted(TOYS))}")
    return TOYS[name](seed, n, **options)
