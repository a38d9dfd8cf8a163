"""An independent float64 NumPy re-derivation of KNOWN, written from the spec text
(docs/spec.md §3–4) without using know_kernels, to check the reference against."""
import numpy as np


def leaky(v):
    return np.where(v > 0, v, 0.3 * v)


def stream(inp, W1, b1, Wd, bd, Wa, ba, Wb, bb, Wc, bc, W2, b2):
    h = inp @ W1 + b1
    z = np.maximum(h @ Wd + bd, 0.0)
    a, b, c = z @ Wa + ba, z @ Wb + bb, z @ Wc + bc
    return leaky((a + b * np.exp(c * h)) @ W2 + b2)


def keras_head(x, layers):
    """``layers``: list of 13 (kernel, bias) pairs in Keras order dense, dense_1 … dense_12."""
    flat = lambda ls: [a for kb in ls for a in kb]
    d = np.diff(x, axis=1)
    u = np.concatenate([stream(x, *flat(layers[0:6])), stream(d, *flat(layers[6:12]))], axis=1)
    Wo, bo = layers[12]
    return np.tanh(u @ Wo + bo)[:, 0]


def predict(w, layers, norm, steps):
    """Iterated prediction by sliding the window; returns (N, steps)."""
    w = np.array(w, dtype=np.float64)
    outs = []
    for _ in range(steps):
        if norm == "raw":
            nxt = w[:, -1] + keras_head(w, layers)
        else:
            m0 = w[:, :1]
            x = w - m0
            s = 2.0 * (x.max(axis=1, keepdims=True) - x.min(axis=1, keepdims=True) + 1e-8 + 1e-5)
            x = x / s
            nxt = (x[:, -1] + keras_head(x, layers)) * s[:, 0] + m0[:, 0]
        outs.append(nxt)
        w = np.concatenate([w[:, 1:], nxt[:, None]], axis=1)
    return np.stack(outs, axis=1)


def random_layers(S=5, seed=0):
    """13 random (kernel, bias) pairs of the shapes a Keras KNOWN head has."""
    rng = np.random.default_rng(seed)
    shapes = [(S, 64), (64, 8), (8, 64), (8, 64), (8, 64), (64, 32),
              (S - 1, 64), (64, 8), (8, 64), (8, 64), (8, 64), (64, 32), (64, 1)]
    return [(rng.normal(0, 0.3, s), rng.normal(0, 0.1, s[1])) for s in shapes]


def layers_of(head):
    """A KNOWNHead's parameters as the 13 Keras (kernel, bias) pairs."""
    p = {k: v.detach().double().numpy() for k, v in head.params_dict().items()}
    roles = ("1", "d", "a", "b", "c", "2")
    return ([(p[f"x.w{r}"], p[f"x.b{r}"]) for r in roles]
            + [(p[f"d.w{r}"], p[f"d.b{r}"]) for r in roles] + [(p["wo"], p["bo"])])


def write_keras_h5(path, layers, nested=False, drop=None):
    """Write a head in the authors' Keras legacy HDF5 layout (optionally under model_weights/,
    optionally without one layer)."""
    import h5py
    with h5py.File(path, "w") as fh:
        root = fh.create_group("model_weights") if nested else fh
        for i, (k, b) in enumerate(layers):
            name = "dense" if i == 0 else f"dense_{i}"
            if name == drop:
                continue
            g = root.create_group(f"{name}/{name}")
            g.create_dataset("kernel:0", data=k.astype(np.float32))
            g.create_dataset("bias:0", data=b.astype(np.float32))
