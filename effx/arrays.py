"""What the decode loop needs beyond the Python array API standard, for each namespace it runs on.

The loop is written against the standard (``array_api_compat`` gives the torch and numpy namespaces); the
few operations the standard lacks, or where the library's own kernel is much faster than a standard
composition, are here, chosen by namespace: top-k, in-place scatter along an axis, and random draws.
"""

from __future__ import annotations

from typing import Any, TypeAlias

import array_api_compat

__all__ = [
    "Array",
    "Namespace",
    "as_array",
    "copy",
    "multinomial",
    "namespace",
    "new_rng",
    "put_along_axis",
    "softmax",
    "take_along_axis",
    "topk",
    "uniform",
]

# The loop is duck-typed over torch tensors and numpy arrays through the array API standard, which has no
# static types, and neither library's types describe the other's: to the type checker both are Any. These
# names say which is meant where an annotation would otherwise be a bare Any.
Array: TypeAlias = Any
"""A torch tensor or a numpy array (the decode loop's arrays)."""
Namespace: TypeAlias = Any
"""An array API namespace (``array_api_compat``'s torch or numpy namespace)."""


def namespace(*arrays: Array) -> Namespace:
    """The array API namespace of ``arrays`` (torch or numpy, through ``array_api_compat``)."""
    return array_api_compat.array_namespace(*arrays)


def as_array(xp: Namespace, x: Any) -> Array:
    """``x`` as an array of ``xp``: unchanged when it already is one, else converted (lists, other libraries'
    arrays)."""
    if array_api_compat.is_array_api_obj(x) and array_api_compat.array_namespace(x) is xp:
        return x
    return xp.asarray(x)


def _is_torch(xp: Namespace) -> bool:
    return array_api_compat.is_torch_namespace(xp)


def copy(xp: Namespace, x: Array) -> Array:
    """A copy of ``x`` that may be written to."""
    return x.clone() if _is_torch(xp) else x.copy()


def softmax(xp: Namespace, x: Array, axis: int = -1) -> Array:
    """Softmax in float32 along ``axis`` (``-inf`` entries get probability 0)."""
    x = xp.astype(x, xp.float32)
    if _is_torch(xp):
        return x.softmax(axis)
    e = xp.exp(x - xp.max(x, axis=axis, keepdims=True))
    return e / xp.sum(e, axis=axis, keepdims=True)


def topk(xp: Namespace, x: Array, k: int) -> tuple[Array, Array]:
    """``(values, indices)`` of the ``k`` largest entries along the last axis, largest first (``k`` is
    capped at the axis length)."""
    k = min(k, x.shape[-1])
    if _is_torch(xp):
        out = x.topk(k, dim=-1)
        return out.values, out.indices
    import numpy as np

    part = np.argpartition(-x, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(x, part, -1), axis=-1, kind="stable")
    idx = np.take_along_axis(part, order, -1)
    return np.take_along_axis(x, idx, -1), idx


def put_along_axis(xp: Namespace, arr: Array, indices: Array, values: Array, axis: int) -> None:
    """``arr[..., indices[...], ...] = values`` along ``axis``, in place; ``indices`` broadcasts against
    ``values``."""
    indices = xp.broadcast_to(indices, values.shape)
    if _is_torch(xp):
        arr.scatter_(axis, indices, values)
    else:
        import numpy as np

        np.put_along_axis(arr, indices, values, axis)


def take_along_axis(xp: Namespace, arr: Array, indices: Array, axis: int) -> Array:
    """``arr`` gathered along ``axis`` at ``indices`` (which broadcasts against ``arr`` on the other axes)."""
    shape = list(arr.shape)
    shape[axis] = indices.shape[axis]
    indices = xp.broadcast_to(indices, tuple(shape))
    if _is_torch(xp):
        return arr.gather(axis, indices)
    import numpy as np

    return np.take_along_axis(arr, indices, axis)


def new_rng(xp: Namespace, seed: int | None) -> Any:
    """A random source for :func:`multinomial`: a numpy ``Generator``, or a seeded ``torch.Generator``
    (None without a seed: torch's global generator, which ``torch.manual_seed`` sets)."""
    if _is_torch(xp):
        import torch

        return None if seed is None else torch.Generator().manual_seed(seed)
    import numpy as np

    return np.random.default_rng(seed)


def uniform(xp: Namespace, n: int, rng: Any) -> Array:
    """``n`` draws from U[0, 1), float64 ``[n]``, from the random source of :func:`new_rng`."""
    if _is_torch(xp):
        import torch

        return torch.rand(n, generator=rng, dtype=torch.float64)
    return xp.asarray(rng.random(n))


def multinomial(xp: Namespace, probs: Array, rng: Any) -> Array:
    """One draw per row of ``probs [batch, vocab]``: token ids ``[batch]``."""
    if _is_torch(xp):
        import torch

        return torch.multinomial(probs, 1, generator=rng).squeeze(-1)
    u = rng.random(probs.shape[0])
    cdf = xp.cumulative_sum(xp.astype(probs, xp.float64), axis=-1)
    cdf = cdf / cdf[:, -1:]
    ids = xp.sum(xp.astype(cdf < u[:, None], xp.int64), axis=-1)
    return xp.clip(ids, max=probs.shape[-1] - 1)
