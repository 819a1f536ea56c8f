# A numpy-only port of the MNIST-1D dataset generator.
#
# MNIST-1D: Sam Greydanus (2020), with Peter Steinbach (2024).
# Original: https://github.com/greydanus/mnist1d (mnist1d/data.py, transform.py, utils.py),
# licensed under the Apache License, Version 2.0. This port follows that code step by step and
# replaces its scipy calls (`scipy.interpolate.interp1d(kind="linear")` and
# `scipy.ndimage.gaussian_filter(sigma=2)`) by numpy equivalents, so that no scipy, matplotlib or
# requests is needed at run time. Random draws come from a private `np.random.RandomState(seed)` in
# the original's order, so `make_dataset()` gives the arrays of the original's
# `make_dataset(get_dataset_args())` (equal to float rounding) without touching numpy's global seed.
"""MNIST-1D: a small 1-D stand-in for MNIST, generated offline (Greydanus 2020).

Ten 12-point templates (one per digit) are padded, stretched, scaled,
translated, given correlated and i.i.d. noise, sheared and resampled to 40
points. The defaults give 4000 training and 1000 test signals, 400 + 100 per
class on average; an MLP reaches about 68% test accuracy and a small CNN about
94% (Greydanus 2020, "Scaling down deep learning").

  data = make_dataset()
  data["x"].shape, data["y"].shape            # (4000, 40), (4000,)
  data["x_test"].shape, data["y_test"].shape  # (1000, 40), (1000,)
"""

from typing import Dict, Optional, Sequence

import numpy as np

# The original's `get_dataset_args()`, less `seed`, `num_samples`, `train_split` and `url`.
_TEMPLATE_LEN = 12
_PADDING = (36, 60)
_SCALE_COEFF = 0.4
_MAX_TRANSLATION = 48
_CORR_NOISE_SCALE = 0.25
_IID_NOISE_SCALE = 2e-2
_SHEAR_SCALE = 0.75
_FINAL_SEQ_LENGTH = 40


def get_templates() -> Dict[str, np.ndarray]:
    """The ten 1-D digit templates `x` [10, 12], their abscissae `t` [12] and labels `y` [10]."""
    d0 = np.asarray([5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5])
    d1 = np.asarray([5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5])
    d2 = np.asarray([5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5])
    d3 = np.asarray([5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5])
    d4 = np.asarray([5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5])
    d5 = np.asarray([5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5])
    d6 = np.asarray([5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5])
    d7 = np.asarray([5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5])
    d8 = np.asarray([5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5])
    d9 = np.asarray([5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5])

    x = np.stack([d0, d1, d2, d3, d4, d5, d6, d7, d8, d9])
    x -= x.mean(1, keepdims=True)  # whiten
    x /= x.std(1, keepdims=True)
    x -= x[:, :1]  # signal starts and ends at 0
    return {"x": x / 6.0, "t": np.linspace(-5, 5, len(d0)) / 6.0, "y": np.arange(10)}


def _interpolate(x: np.ndarray, n: int) -> np.ndarray:
    """Resamples `x` linearly to `n` points (scipy's `interp1d(kind="linear")` delegates to np.interp)."""
    return np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(x)), x)


def _gaussian_filter(x: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """1-D Gaussian smoothing with half-sample reflection (scipy.ndimage's default `mode="reflect"`)."""
    radius = int(truncate * float(sigma) + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / (sigma * sigma) * offsets**2)
    weights /= weights.sum()
    padded = np.pad(x, radius, mode="symmetric")  # scipy's "reflect": d c b a | a b c d | d c b a
    return np.convolve(padded, weights, mode="valid")


def _transform(x: np.ndarray, t: np.ndarray, rng: np.random.RandomState, *, template_len: int,
               padding: Sequence[int], scale_coeff: float, max_translation: int, corr_noise_scale: float,
               iid_noise_scale: float, shear_scale: float, final_seq_length: int, eps: float = 1e-8):
    """One random signal from template `x` (the original's `transform.transform`)."""
    low, high = padding
    p = low + int(rng.rand() * (high - low + 1))
    new_x = np.concatenate([x + eps, np.zeros(p)])  # pad
    new_x = _interpolate(new_x, template_len + padding[-1])  # dilate
    new_t = _interpolate(t, template_len + padding[-1])
    new_x *= 1 + scale_coeff * (rng.rand() - 0.5)  # scale
    k = rng.choice(max_translation)  # translate (k = 0 keeps the signal: x[-0:] is all of x)
    new_x = np.concatenate([new_x[-k:], new_x[:-k]])

    # Correlated noise where the signal is zero, i.i.d. noise everywhere.
    mask = new_x != 0
    corr_noise = _gaussian_filter(corr_noise_scale * rng.randn(*new_x.shape), 2)
    new_x = mask * new_x + (1 - mask) * corr_noise
    new_x = new_x + iid_noise_scale * rng.randn(*new_x.shape)

    coeff = shear_scale * (rng.rand() - 0.5)  # shear
    new_x = new_x - coeff * np.linspace(-0.5, 0.5, len(new_x))
    return _interpolate(new_x, final_seq_length), _interpolate(new_t, final_seq_length)  # subsample


def make_dataset(num_samples: int = 5000, train_split: float = 0.8, seed: int = 42, *,
                 template_len: int = _TEMPLATE_LEN, padding: Sequence[int] = _PADDING,
                 scale_coeff: float = _SCALE_COEFF, max_translation: int = _MAX_TRANSLATION,
                 corr_noise_scale: float = _CORR_NOISE_SCALE, iid_noise_scale: float = _IID_NOISE_SCALE,
                 shear_scale: float = _SHEAR_SCALE, shuffle_seq: bool = False,
                 final_seq_length: int = _FINAL_SEQ_LENGTH,
                 templates: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, np.ndarray]:
    """Generates MNIST-1D; the defaults are the original's `get_dataset_args()`.

    Args:
      num_samples: signals in all, `num_samples // 10` per class.
      train_split: the fraction of the (shuffled) signals that is the training set.
      seed: seeds a private `np.random.RandomState`; numpy's global state is left alone.
      template_len, padding, scale_coeff, max_translation, corr_noise_scale,
        iid_noise_scale, shear_scale, shuffle_seq, final_seq_length: the
        original's transformation parameters of the same names.
      templates: `get_templates()` when None.

    Returns:
      A dict like the original's: `x` [n_train, final_seq_length] float64,
      `y` [n_train] int64, `x_test`, `y_test`, `t` [final_seq_length] (the
      signals' abscissae) and `templates`. Signals are centred and scaled to
      standard deviation 1 over the whole dataset.

    Raises:
      ValueError: `num_samples` gives no signal of some class, or `train_split`
        is not in [0, 1].
    """
    templates = get_templates() if templates is None else templates
    num_classes = len(templates["y"])
    if num_samples < num_classes:
        raise ValueError(f"`num_samples` must be at least {num_classes} (one per class). "
                         f"Received: num_samples={num_samples}")
    if not 0 <= train_split <= 1:
        raise ValueError(f"`train_split` must be in [0, 1]. Received: train_split={train_split}")
    rng = np.random.RandomState(seed)
    params = dict(template_len=template_len, padding=tuple(padding), scale_coeff=scale_coeff,
                  max_translation=max_translation, corr_noise_scale=corr_noise_scale,
                  iid_noise_scale=iid_noise_scale, shear_scale=shear_scale, final_seq_length=final_seq_length)

    xs, ys = [], []
    for label_ix in range(num_classes):
        for _ in range(num_samples // num_classes):
            x, new_t = _transform(templates["x"][label_ix], templates["t"], rng, **params)
            xs.append(x)
            ys.append(templates["y"][label_ix])

    batch_shuffle = rng.permutation(len(ys))
    xs = np.stack(xs)[batch_shuffle]
    ys = np.stack(ys)[batch_shuffle]
    if shuffle_seq:
        xs = xs[..., rng.permutation(final_seq_length)]

    new_t = new_t / xs.std()
    xs = (xs - xs.mean()) / xs.std()  # centre the dataset, standard deviation 1

    split_ix = int(len(ys) * train_split)
    return {"x": xs[:split_ix], "x_test": xs[split_ix:], "y": ys[:split_ix], "y_test": ys[split_ix:],
            "t": new_t, "templates": templates}
