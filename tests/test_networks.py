import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fastsample.models.networks import MLP, NetworkFn, UNet, make_network, sinusoidal_embedding


@jax.jit
def call(net, x, label, cond=None):
    """The network under jit (eager calls compile every operation separately)."""
    return net(x, label, cond)


def test_sinusoidal_embedding_closed_form():
    label = jnp.asarray([0.0, 0.5])
    e = sinusoidal_embedding(label, 8, max_freq=8.0)
    freqs = 8.0 ** (np.arange(4) / 3)  # geometric from 1 to max_freq
    np.testing.assert_allclose(e[0], np.r_[np.ones(4), np.zeros(4)], atol=0)
    np.testing.assert_allclose(e[1], np.r_[np.cos(0.5 * freqs), np.sin(0.5 * freqs)], rtol=1e-6)
    with pytest.raises(ValueError, match="must be even"):
        sinusoidal_embedding(label, 7)


@pytest.fixture(scope="module")
def unet():
    """One small digits U-Net with random (not zero) output weights, shared by the tests."""
    return NetworkFn.from_module(make_network("unet", 64, channels=(8, 16), zero_init=False))


@pytest.mark.parametrize("kind", ["mlp", "unet"])
def test_networks_start_at_zero_and_keep_shapes(kind, unet):
    if kind == "mlp":
        net = NetworkFn.from_module(make_network(kind, 64, hidden=32, depth=1))
    else:  # the shared U-Net with its output layer set to zero, as zero_init=True builds it
        params = dict(unet.params, out=jax.tree.map(jnp.zeros_like, unet.params["out"]))
        net = unet.replace(params)
        assert np.all(np.asarray(NetworkFn.from_module(make_network(kind, 64, channels=(8,)))
                                 .params["out"]["kernel"]) == 0)
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 64))
    out = call(net, x, 0.3)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_array_equal(out, 0.0)  # zero-initialised output layer
    # per-sample labels and a scalar label agree
    np.testing.assert_array_equal(call(net, x, jnp.full((5,), 0.3)), out)


def test_unet_takes_flat_or_image_input_and_mixes_pixels(unet):
    net = unet
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 64))
    flat = call(net, x, 0.1)
    img = call(net, x.reshape(3, 8, 8, 1), 0.1)
    assert img.shape == (3, 8, 8, 1)
    np.testing.assert_allclose(img.reshape(3, 64), flat, rtol=1e-6, atol=1e-6)
    # convolutions: changing one pixel changes its neighbours' outputs, not only itself
    x2 = x.at[:, 27].add(1.0)
    diff = np.abs(np.asarray(call(net, x2, 0.1) - flat)).reshape(3, 8, 8)
    assert np.all(diff[:, 3, 4] > 0) and np.all(diff[:, 3, 2] > 0)
    # samples are independent: a change in sample 0 leaves samples 1 and 2 alone (GroupNorm per sample)
    x3 = x.at[0].add(1.0)
    np.testing.assert_array_equal(call(net, x3, 0.1)[1:], flat[1:])


def test_class_conditioning_and_null_class():
    net = NetworkFn.from_module(make_network("mlp", 4, hidden=16, depth=1, num_classes=3, zero_init=False))
    x = jax.random.normal(jax.random.PRNGKey(2), (3, 4))
    by_class = [call(net, x, 0.2, jnp.full((3,), c)) for c in range(4)]
    assert not np.allclose(by_class[0], by_class[1])
    np.testing.assert_array_equal(call(net, x, 0.2, None), by_class[3])  # cond=None is the null class 3
    mixed = call(net, x, 0.2, jnp.asarray([0, 1, 2]))
    for i in range(3):
        np.testing.assert_array_equal(mixed[i], by_class[i][i])
    unconditional = NetworkFn.from_module(make_network("mlp", 4, hidden=16, depth=1))
    with pytest.raises(ValueError, match="unconditional"):
        call(unconditional, x, 0.2, jnp.zeros(3, jnp.int32))


def test_network_runs_in_the_dtype_of_its_input(x64):
    net = NetworkFn.from_module(make_network("mlp", 2, hidden=8, depth=1, zero_init=False))
    x32 = jnp.ones((2, 2), jnp.float32)
    out64 = call(net, x32.astype(jnp.float64), 0.5)
    assert out64.dtype == jnp.float64 and call(net, x32, 0.5).dtype == jnp.float32
    np.testing.assert_allclose(out64, call(net, x32, 0.5), rtol=1e-5)


def test_network_errors():
    with pytest.raises(ValueError, match="unknown network kind 'cnn'; allowed: mlp, unet"):
        make_network("cnn", 4)
    with pytest.raises(ValueError, match="has 64 values; the data has dimension 2"):
        make_network("unet", 2)
    with pytest.raises(ValueError, match="divisible by 4"):
        UNet(image_shape=(6, 6, 1), channels=(8, 8, 8), rngs=__import__("flax").nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden must be a positive integer"):
        MLP(4, hidden=0, rngs=__import__("flax").nnx.Rngs(0))
    net = NetworkFn.from_module(make_network("mlp", 4, hidden=8, depth=1))
    with pytest.raises(ValueError, match="built for dimension 4"):
        net(jnp.ones((2, 3)), 0.1)
