"""The optimizer a config asks for: schedules, weight decay, clipping, label smoothing."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cifar_jax import TrainConfig, parallel
from cifar_jax.errors import ConfigError
from cifar_jax.models import init_params
from cifar_jax.optim import create_optimizer, learning_rate_schedule, steps_per_epoch
from cifar_jax.parallel import DeviceSet
from cifar_jax.steps import TrainState, apply_model, build_train_step, cross_entropy_loss, empty_running_metrics
from learnable import photo_batch


# ---------------------------------------------------------------- schedules and optimizer


def schedule_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"epochs": 10, "learning_rate": 0.1, **overrides}).resolved()


def test_constant_schedule_is_the_plain_rate_and_optimizer_is_unchanged():
    config = schedule_config()
    assert learning_rate_schedule(config, steps_per_epoch=100) == 0.1
    params = {"w": jnp.ones(3)}
    ours, adam = create_optimizer(config, 100), optax.adam(0.1)
    assert jax.tree.structure(ours.init(params)) == jax.tree.structure(adam.init(params))
    grads = {"w": jnp.array([1.0, -2.0, 3.0])}
    np.testing.assert_array_equal(ours.update(grads, ours.init(params), params)[0]["w"],
                                  adam.update(grads, adam.init(params), params)[0]["w"])


def test_constant_schedule_with_warmup_ramps_linearly_then_holds():
    schedule = learning_rate_schedule(schedule_config(warmup_epochs=2.0), steps_per_epoch=50)
    assert [float(schedule(step)) for step in (0, 50, 100, 999)] == pytest.approx([0.0, 0.05, 0.1, 0.1])


def test_cosine_schedule_warms_up_then_decays_to_zero():
    schedule = learning_rate_schedule(schedule_config(lr_schedule="cosine", warmup_epochs=1.0), steps_per_epoch=100)
    # 100 warm-up steps to the peak, then half a cosine over the remaining 900 steps.
    assert float(schedule(0)) == 0.0
    assert float(schedule(50)) == pytest.approx(0.05)
    assert float(schedule(100)) == pytest.approx(0.1)
    assert float(schedule(550)) == pytest.approx(0.05, rel=1e-4)
    assert float(schedule(1000)) == pytest.approx(0.0, abs=1e-7)


def test_onecycle_schedule_rises_over_the_warmup_then_anneals():
    config = schedule_config(lr_schedule="onecycle")
    assert config.warmup_epochs == pytest.approx(3.0)  # the default: 0.3 x 10 epochs
    schedule = learning_rate_schedule(config, steps_per_epoch=100)
    assert float(schedule(0)) == pytest.approx(0.1 / 25)
    assert float(schedule(150)) == pytest.approx((0.1 + 0.1 / 25) / 2, rel=1e-4)
    assert float(schedule(300)) == pytest.approx(0.1)
    assert float(schedule(1000)) == pytest.approx(0.1 / 25 / 1e4, rel=1e-3)


def test_weight_decay_and_clipping_change_the_update_as_documented():
    params = {"w": jnp.array([2.0, 0.0])}
    grads = {"w": jnp.array([0.0, 30.0])}
    sgd = create_optimizer(schedule_config(optimizer="sgd", weight_decay=0.5, grad_clip_norm=3.0), 10)
    updates, _ = sgd.update(grads, sgd.init(params), params)
    # Clipped to norm 3 first ([0, 3]), then L2 decay adds 0.5 * w ([1, 0]); SGD steps by -0.1 x that.
    np.testing.assert_allclose(updates["w"], [-0.1, -0.3], rtol=1e-6)
    adamw = create_optimizer(schedule_config(optimizer="adamw", weight_decay=0.5), 10)
    updates, _ = adamw.update({"w": jnp.zeros(2)}, adamw.init(params), params)
    np.testing.assert_allclose(updates["w"], [-0.1 * 0.5 * 2.0, 0.0], rtol=1e-6)  # decoupled: lr x wd x w
    assert schedule_config(optimizer="adamw").weight_decay == 1e-4  # optax's own default when unset


def test_steps_per_epoch_drops_the_partial_batch_and_refuses_a_too_large_batch():
    assert steps_per_epoch(50_000, 128) == 390
    with pytest.raises(ConfigError, match="batch_size 600 is larger than the 512 training images"):
        steps_per_epoch(512, 600)


def test_label_smoothing_mixes_the_uniform_distribution_into_the_targets():
    logits = jnp.array([[2.0, 0.0, -1.0]])
    log_probs = jax.nn.log_softmax(logits)[0]
    smoothed = cross_entropy_loss(logits, jnp.array([0]), label_smoothing=0.3)
    expected = -(0.8 * log_probs[0] + 0.1 * log_probs[1] + 0.1 * log_probs[2])
    assert float(smoothed[0]) == pytest.approx(float(expected), rel=1e-6)
    assert float(cross_entropy_loss(logits, jnp.array([0]))[0]) == pytest.approx(float(-log_probs[0]), rel=1e-6)


@pytest.mark.slow
def test_train_loss_is_reported_without_smoothing_while_the_gradient_follows_it():
    images, labels = photo_batch(16), np.arange(16, dtype=np.int32) % 10
    graphdef, params = init_params("model0", seed=2)
    devices = DeviceSet.select(4)
    plain_loss = float(cross_entropy_loss(apply_model(graphdef, params, images.astype(np.float32) / 255),
                                          labels).mean())
    reported, stepped = {}, {}
    for smoothing in (0.0, 0.3):
        config = TrainConfig(model="model0", batch_size=16, label_smoothing=smoothing, epochs=1).resolved()
        optimizer = create_optimizer(config, steps_per_epoch=1)
        step = build_train_step(config, graphdef, optimizer, devices)
        state = TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))
        state, running = step(*devices.replicate((state, empty_running_metrics(), images, labels)),
                              devices.split(np.arange(16)))
        sums = parallel.unreplicate(running)
        reported[smoothing] = float(sums["loss_sum"]) / int(sums["count"])
        stepped[smoothing] = parallel.unreplicate(state).params
    assert reported[0.3] == pytest.approx(plain_loss, rel=1e-5) and reported[0.0] == pytest.approx(plain_loss, rel=1e-5)
    flat = {smoothing: np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(tree)])
            for smoothing, tree in stepped.items()}
    assert not np.allclose(flat[0.3], flat[0.0], rtol=0, atol=1e-6)  # smoothing changed the update
