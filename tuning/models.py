"""The benchmark models, built with Keras (uncompiled).

`tuning.benchmarks` holds the table that names them; it imports this module
(and so Keras) only when a model is built, so that the command line checks
its arguments before TensorFlow loads.
"""

import keras
from keras import layers, ops


def digits_mlp(input_shape):
    """64 -> 64 ReLU -> 10 softmax, for scikit-learn's digits."""
    return keras.Sequential([
        keras.Input(input_shape),
        layers.Dense(64, activation="relu"),
        layers.Dense(10, activation="softmax"),
    ], name="digits_mlp")


def logistic_regression(input_shape, l2=1e-4, input_dropout=0.0,
                        classes=10):
    """L2-regularised (multiclass) logistic regression (Section 6.1)."""
    model = keras.Sequential(name="logistic_regression")
    model.add(keras.Input(input_shape))
    if input_dropout:
        model.add(layers.Dropout(input_dropout))
    model.add(layers.Dense(
        1 if classes == 2 else classes,
        activation="sigmoid" if classes == 2 else "softmax",
        kernel_regularizer=keras.regularizers.L2(l2),
    ))
    return model


def mnist_mlp(input_shape, hidden=1000, dropout=0.5):
    """Two hidden layers of 1000 ReLU with dropout (Section 6.2)."""
    return keras.Sequential([
        keras.Input(input_shape),
        layers.Dense(hidden, activation="relu"),
        layers.Dropout(dropout),
        layers.Dense(hidden, activation="relu"),
        layers.Dropout(dropout),
        layers.Dense(10, activation="softmax"),
    ], name="mnist_mlp")


def cifar10_cnn(input_shape, input_dropout=0.2, dropout=0.5):
    """c64-c64-c128-1000 (Section 6.3): 5x5 convs, 3x3/2 max-pools."""
    model = keras.Sequential(name="cifar10_cnn")
    model.add(keras.Input(input_shape))
    model.add(layers.Dropout(input_dropout))
    for filters in (64, 64, 128):
        model.add(layers.Conv2D(filters, 5, padding="same",
                                activation="relu"))
        model.add(layers.MaxPooling2D(3, strides=2, padding="same"))
    model.add(layers.Flatten())
    model.add(layers.Dense(1000, activation="relu"))
    model.add(layers.Dropout(dropout))
    model.add(layers.Dense(10, activation="softmax"))
    return model


def finetune_cnn(input_shape, backbone=None, classes=10):
    """c16-c32-64 on 28x28 images, then a new `head` of `classes`.

    `backbone`: the weights of every layer but the head, in order (what
    `tuning.pretrain.backbone` gives), or None for random ones. Layers are
    named so that variable paths (`finetune_cnn/conv1/kernel`...), and so
    `variable_groups` rules, are the same in every session.
    """
    model = keras.Sequential([
        keras.Input(input_shape),
        layers.Conv2D(16, 3, padding="same", activation="relu",
                      name="conv1"),
        layers.MaxPooling2D(2, name="pool1"),
        layers.Conv2D(32, 3, padding="same", activation="relu",
                      name="conv2"),
        layers.MaxPooling2D(2, name="pool2"),
        layers.Flatten(name="flatten"),
        layers.Dense(64, activation="relu", name="features"),
        layers.Dense(classes, activation="softmax", name="head"),
    ], name="finetune_cnn")
    if backbone is not None:
        set_backbone(model, backbone)
    return model


def backbone_weights(model):
    """The weights of every layer of `model` but the last (the head)."""
    return [w for layer in model.layers[:-1] for w in layer.get_weights()]


def set_backbone(model, weights):
    """Sets every layer of `model` but the last from `weights`
    (`backbone_weights` of a model of the same shape)."""
    weights = list(weights)
    for layer in model.layers[:-1]:
        count = len(layer.weights)
        layer.set_weights(weights[:count])
        weights = weights[count:]
    if weights:
        raise ValueError(f"Argument `backbone` has {len(weights)} arrays "
                         "more than the model's layers below its head take")


@keras.saving.register_keras_serializable(package="tuning")
class GaussianSample(layers.Layer):
    """z = mu + exp(log_var / 2) * noise; adds the KL term to the loss."""

    def __init__(self, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs):
        mu, log_var = inputs
        kl = -0.5 * ops.sum(1 + log_var - ops.square(mu) - ops.exp(log_var),
                            axis=-1)
        self.add_loss(ops.mean(kl))
        noise = keras.random.normal(ops.shape(mu), seed=self.seed_generator)
        return mu + ops.exp(0.5 * log_var) * noise

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="tuning")
def bernoulli_nll(y_true, logits):
    """Per-example Bernoulli negative log-likelihood summed over pixels."""
    per_pixel = keras.losses.binary_crossentropy(
        y_true[..., None], logits[..., None], from_logits=True
    )
    return ops.sum(per_pixel, axis=-1)


def mnist_vae(input_shape, hidden=500, latent=50):
    """VAE of Section 6.4: 500 softplus units, 50-d Gaussian latent.

    The loss (reconstruction NLL + KL) is the negative ELBO in nats.
    """
    x = keras.Input(input_shape)
    h = layers.Dense(hidden, activation="softplus")(x)
    mu = layers.Dense(latent)(h)
    log_var = layers.Dense(latent)(h)
    z = GaussianSample(seed=0)([mu, log_var])
    h2 = layers.Dense(hidden, activation="softplus")(z)
    logits = layers.Dense(input_shape[-1])(h2)
    return keras.Model(x, logits, name="mnist_vae")
