# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The paper, worked through
#
# Every worked example of the paper, computed with tf_jacbp and printed beside its formula.
#
#     python examples/paper_walkthrough.py [--out DIR]      # as a script
#     jupyter lab examples/paper_walkthrough.ipynb           # as a notebook (the same source)
#
# Section 3.1 (one layer, 4 features, 3 classes), 3.2 (two layers), 3.3 (LeNet-100-300-10's
# three blocks), 3.4 (ReLU's 0/1 diagonal), 3.5 (the 3 x 3 / 2 x 2 Toeplitz matrix and Lemma 3),
# and Table 1's three rows against autodiff. Each result is checked against ``tf.GradientTape``
# through the reference route; the pictures of ``tf_jacbp.plot`` are saved in ``--out``.

# %%
from __future__ import annotations

import argparse
import os
import sys

import keras
import numpy as np
import tensorflow as tf

import tf_jacbp
from tf_jacbp import jacobian, layers, losses, models, plot, toeplitz

np.set_printoptions(precision=3, suppress=True, linewidth=110)


def _autodiff_gradient(model, loss, x, y) -> np.ndarray:
    """``grad_theta l`` through stock ops (reference route), in theta order."""
    variables = jacobian.parameter_variables(model)
    with tf.GradientTape() as tape:
        with tf_jacbp.reference_mode():
            value = loss(y, model(x))
    grads = tape.gradient(value, variables)
    return np.concatenate([np.asarray(g).reshape(-1, order="F") for g in grads])


def _dense_net(sizes: list[int], activation: str = "relu") -> keras.Sequential:
    stack = [keras.Input((sizes[0],), dtype="float64")]
    stack += [layers.Dense(n, activation=activation, dtype="float64") for n in sizes[1:-1]]
    stack.append(layers.Dense(sizes[-1], dtype="float64"))
    return keras.Sequential(stack)


def output_directory() -> str:
    """``--out DIR`` (default ``walkthrough``); a notebook kernel's own arguments are ignored."""
    parser = argparse.ArgumentParser(description="The paper's worked examples.")
    parser.add_argument("--out", default="walkthrough", help="directory for the PNG pictures")
    directory = parser.parse_known_args()[0].out
    os.makedirs(directory, exist_ok=True)
    return directory


def show(path: str) -> None:
    """Show a saved picture inline in a notebook; elsewhere, print where it is."""
    if "IPython" in sys.modules and sys.modules["IPython"].get_ipython() is not None:
        from IPython.display import Image, display

        display(Image(filename=path))
    else:
        print("picture:", path)


OUT = output_directory()
out: dict = {"pictures": []}


# %% [markdown]
# ## 3.1 One layer
#
# For `z = W^T x + b` with 4 features and 3 classes, `J_theta z = [I_3 (x) x^T | I_3]`, a
# `3 x 15` matrix, and `grad_theta l = (J_theta z)^T delta` with Table 1's
# `delta = -(y - yhat)`.


# %%
def section_3_1(out: dict) -> None:
    print("== 3.1 One layer: 4 features, 3 classes, softmax + cross entropy")
    model = _dense_net([4, 3])
    x, y = np.array([[1.0, 2.0, 3.0, 4.0]]), np.array([[0.0, 1.0, 0.0]])
    j = np.asarray(jacobian.parameter_jacobian(model, x))[0]
    print("J_theta z = [I_3 (x) x^T | I_3], shape", j.shape)
    print(j)
    delta = np.asarray(tf.nn.softmax(model(x)))[0] - y[0]  # Table 1: -(y - yhat)
    grad = j.T @ delta
    reference = _autodiff_gradient(
        model, losses.CategoricalCrossentropy(from_logits=True, dtype="float64"), x, y
    )
    print(
        "grad_theta l = -(J_theta z)^T (y - yhat), 15 entries; autodiff max difference",
        f"{np.max(np.abs(grad - reference)):.1e}",
    )
    out["3.1"] = {"J": j, "gradient": grad, "error": float(np.max(np.abs(grad - reference)))}


section_3_1(out)


# %% [markdown]
# ## 3.2 Two layers
#
# Algorithm 1's block for the first layer is the chain `W2^T D1 [I (x) x^T | I]`; the factors
# come from `layer_jacobians`.


# %%
def section_3_2(out: dict) -> None:
    print("\n== 3.2 Two layers: 4 -> 5 (ReLU) -> 3")
    model = _dense_net([4, 5, 3])
    x = np.array([[0.5, -1.0, 2.0, 0.3]])
    blocks = jacobian.parameter_jacobian(model, x, blocks=True)
    shapes = {k: tuple(v.shape[1:]) for k, v in blocks.items()}
    f = jacobian.layer_jacobians(model, x[0])
    first, second = (layer.name for layer in model.layers)
    chain = f[f"{second}: W^T"] @ f[f"{first}: D"] @ f[f"{first}: [I (x) a^T | I]"]
    j1 = np.concatenate([np.asarray(b[0]) for b in list(blocks.values())[:2]], axis=1)
    print(
        "J_{W1,b1} z[2] = W2^T D1 [I (x) x^T | I]:",
        chain.shape,
        f"(chain of factors vs parameter_jacobian: {np.max(np.abs(chain - j1)):.1e})",
    )
    print("J_{W2,b2} z[2] = [I (x) a1^T | I]:", f[f"{second}: [I (x) a^T | I]"].shape)
    print("theta blocks:", shapes)
    out["3.2"] = {"blocks": shapes, "chain_error": float(np.max(np.abs(chain - j1)))}


section_3_2(out)


# %% [markdown]
# ## 3.3 LeNet-100-300-10
#
# The three blocks of `J_theta z[3]`, and the picture of `J_theta z[L]` for a small network:
# one band of columns per `[Vec(W); b]`.


# %%
def section_3_3(out: dict, directory: str) -> None:
    print("\n== 3.3 LeNet-100-300-10 (784 -> 100 -> 300 -> 10)")
    keras.utils.set_random_seed(0)
    model = models.lenet_100_300_10()
    x = np.random.default_rng(0).uniform(size=(1, 28, 28)).astype("float32")
    blocks = jacobian.parameter_jacobian(model, x, blocks=True)
    widths = {}
    for k, v in blocks.items():
        widths[k.split("/", 1)[1]] = int(v.shape[-1])
    per_layer = [
        widths[f"{layer.name}/kernel"] + widths[f"{layer.name}/bias"]
        for layer in model.layers
        if isinstance(layer, layers.Dense)
    ]
    print(
        "J_{W[l],b[l]} z[3] blocks (10 x ...):",
        per_layer,
        "-> J_theta z[3] is 10 x",
        sum(per_layer),
    )
    out["3.3"] = {"blocks": per_layer}
    picture = os.path.join(directory, "J_theta_z.png")
    plot.plot_parameter_jacobian(_dense_net([6, 5, 3]), np.ones((1, 6)), picture)
    out["pictures"].append(picture)


section_3_3(out, OUT)
show(out["pictures"][-1])


# %% [markdown]
# ## 3.4 ReLU
#
# `J_z f(z) = diag(f'(z))`: for ReLU a diagonal of zeros and ones.


# %%
def section_3_4(out: dict) -> None:
    print("\n== 3.4 ReLU: J_z f(z) = diag(f'(z)), zeros and ones")
    z = np.array([-1.5, 0.7, -0.2, 2.0, 0.1])
    d = np.asarray(layers.ReLU().input_jacobian(z))
    print("z =", z)
    print(d)
    out["3.4"] = {"D": d}


section_3_4(out)


# %% [markdown]
# ## 3.5 Convolution as matrix multiplication (Lemmas 2 and 3)
#
# `X * K = Toep(K) Vec(X^T)`, and a conv layer is a dense layer with `W = Toep(K)^T`.


# %%
def section_3_5(out: dict, directory: str) -> None:
    print("\n== 3.5 Convolution as matrix multiplication (Lemmas 2 and 3)")
    k = np.array([[1.0, 2.0], [3.0, 4.0]])  # k1 k2 / k3 k4
    t = np.asarray(toeplitz.conv_matrix(k.reshape(2, 2, 1, 1), (3, 3, 1)))
    print("Toep(K) for a 3 x 3 input and K = [[k1, k2], [k3, k4]] = [[1, 2], [3, 4]]:", t.shape)
    print(t)
    x = np.arange(1.0, 10.0).reshape(1, 3, 3, 1)
    direct = np.asarray(tf.nn.conv2d(x, k.reshape(2, 2, 1, 1), 1, "VALID")).reshape(-1)
    print("Lemma 2: Toep(K) Vec(X^T) =", t @ x.reshape(-1), " conv2d(X, K) =", direct)
    conv = layers.Conv2D(2, 2, bias="untied", dtype="float64")
    conv.build((None, 3, 3, 1))
    conv.bias.assign(np.random.default_rng(0).normal(size=conv.bias.shape))
    w = np.asarray(conv.toeplitz_matrix()).T  # Lemma 3: W = Toep(K)^T
    b = np.asarray(conv.bias).reshape(-1)
    lemma3 = np.max(np.abs(x.reshape(-1) @ w + b - np.asarray(conv(x)).reshape(-1)))
    print(
        f"Lemma 3: conv layer (2 filters, untied bias) = W^T x + b with W = Toep(K)^T: "
        f"max difference {lemma3:.1e}"
    )
    out["3.5"] = {"T": t, "lemma2": (t @ x.reshape(-1), direct), "lemma3_error": float(lemma3)}
    pictures = [os.path.join(directory, name) for name in ("toeplitz.png", "I_kron_a.png")]
    kernel = np.random.default_rng(0).normal(size=(5, 5, 1, 2))
    plot.plot_toeplitz(kernel, (8, 8, 1), pictures[0], padding="same")
    plot.plot_dense_jacobian(_dense_net([4, 3]).layers[0], np.arange(1.0, 5.0), pictures[1])
    out["pictures"] += pictures


section_3_5(out, OUT)
for picture in out["pictures"][-2:]:
    show(picture)


# %% [markdown]
# ## Table 1
#
# The last activation fused with its loss: `grad_z l` by the formula and by autodiff.


# %%
def table_1(out: dict) -> None:
    print("\n== Table 1: grad_z l for the last activation fused with its loss (batch of 1)")
    rng = np.random.default_rng(1)
    z = tf.constant(rng.normal(size=(1, 3)))
    rows = {
        "sigmoid + BCE: -(y - yhat)": (
            losses.BinaryCrossentropy(from_logits=True, dtype="float64"),
            np.array([[1.0, 0.0, 1.0]]),
            tf.math.sigmoid,
            3,
        ),
        "softmax + CE: -(y - yhat)": (
            losses.CategoricalCrossentropy(from_logits=True, dtype="float64"),
            np.array([[0.0, 0.0, 1.0]]),
            tf.nn.softmax,
            1,
        ),
        "identity + SE: -2(y - yhat)": (
            losses.SquaredError(dtype="float64"),
            rng.normal(size=(1, 3)),
            tf.identity,
            0.5,
        ),
    }
    out["table1"] = {}
    for name, (loss, y, f, scale) in rows.items():
        formula = -(y - np.asarray(f(z))) / scale  # BCE is averaged over its 3 outputs
        with tf.GradientTape() as tape:
            tape.watch(z)
            with tf_jacbp.reference_mode():
                value = loss(y, z)
        autodiff = np.asarray(tape.gradient(value, z))
        error = float(np.max(np.abs(formula - autodiff)))
        print(f"{name:30s} formula {formula[0]}  autodiff {autodiff[0]}  difference {error:.1e}")
        out["table1"][name] = error


table_1(out)


# %%
print("\npictures:", ", ".join(out["pictures"]))
