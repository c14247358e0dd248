"""A fitted OOD flag (`featsvm.evaluation.ood.OODFlag`) as ONNX nodes: from the ``features``
tensor [N, dim] a head reads to ``ood_score`` [N] float32 (equal to `OODFlag.score`) and
``ood`` [N] bool (score > the flag's val-chosen threshold, as `OODFlag.flag`).

Plain ONNX operators only (Sub, Div, MatMul, Mul, ReduceSum, Add, Greater), float32, in an
order that keeps float32 sane:

* ``d = (x - mean) / scale - pca_mean``: the StandardScaler and the PCA centring (folded into
  one subtraction and one division, the constants computed in float64);
* ``z = d @ components.T`` (the PCA projection; divided by the singular values' scale when the
  PCA whitens);
* Mahalanobis: ``w = (z - location) @ L`` with ``L`` a square root of the Ledoit-Wolf
  precision matrix (``P = L @ L.T``, from its eigendecomposition in float64), and
  ``maha = sum(w**2) / maha_scale``: scikit-learn's ``mahalanobis`` is that SQUARED distance;
  a sum of squares never goes negative the way ``z @ P @ z.T`` can in float32;
* residual: ``r = d - z_unwhitened @ components`` computed directly (not ``|d|^2 - |z|^2``,
  which cancels), ``resid = sum(r**2) / resid_scale``;
* ``ood_score = 0.5 * (maha + resid)``, ``ood = ood_score > threshold``.

`ood_nodes` gives the nodes and initializers to add to any graph that has the features tensor
(`featsvm.export` adds them to the exported model); `ood_to_onnx` wraps them as a model of
their own (features in, both outputs out).
"""

from __future__ import annotations

from typing import Any

import numpy as np

SCORE = "ood_score"
FLAG = "ood"
OPSET = 17


def _constants(flag: Any) -> dict[str, np.ndarray]:
    """The float32 constants of the graph, computed in float64 from the fitted parts."""
    if not flag.fitted_ or flag.threshold is None:
        raise ValueError("the OOD flag is not fitted and calibrated")
    f = flag.fitted_
    scaler, pca, cov = f["scaler"], f["pca"], f["cov"]
    dim = int(pca.components_.shape[1])
    mean = np.zeros(dim) if getattr(scaler, "mean_", None) is None else scaler.mean_
    scale = np.ones(dim) if getattr(scaler, "scale_", None) is None else scaler.scale_
    mean, scale = np.asarray(mean, np.float64), np.asarray(scale, np.float64)
    components = np.asarray(pca.components_, np.float64)  # [k, dim], orthonormal rows
    project = components.T.copy()  # [dim, k]
    back = components.copy()  # z (unwhitened) @ back reconstructs d
    if getattr(pca, "whiten", False):  # transform divides by sqrt(explained_variance_)
        sd = np.sqrt(np.asarray(pca.explained_variance_, np.float64))
        project = project / sd
        back = back * sd[:, None]
    evals, evecs = np.linalg.eigh(np.asarray(cov.precision_, np.float64))
    root = evecs * np.sqrt(np.clip(evals, 0.0, None))  # P = root @ root.T
    c = {
        "shift": mean + np.asarray(pca.mean_, np.float64) * scale,
        "scale": scale,
        "project": project,
        "back": back,
        "location": np.asarray(cov.location_, np.float64),
        "root": root,
        "maha_scale": np.array(float(f["maha_scale"])),
        "resid_scale": np.array(float(f["resid_scale"])),
        "half": np.array(0.5),
        "threshold": np.array(float(flag.threshold)),
        "axis": np.array([1], dtype=np.int64),
    }
    return {k: v if v.dtype == np.int64 else v.astype(np.float32) for k, v in c.items()}


def ood_nodes(flag: Any, features: str, prefix: str = "ood/") -> tuple[list[Any], list[Any]]:
    """(nodes, initializers) computing ``ood_score`` and ``ood`` (the module doc) from the
    float32 tensor named `features`; every internal name starts with `prefix`."""
    from onnx import helper, numpy_helper

    c = _constants(flag)
    p = prefix
    inits = [numpy_helper.from_array(v, p + k) for k, v in c.items()]

    def node(op: str, inputs: list[str], out: str, **attrs: Any) -> Any:
        return helper.make_node(op, inputs, [out], **attrs)

    nodes = [
        node("Sub", [features, p + "shift"], p + "centred"),
        node("Div", [p + "centred", p + "scale"], p + "d"),
        node("MatMul", [p + "d", p + "project"], p + "z"),
        node("Sub", [p + "z", p + "location"], p + "zc"),
        node("MatMul", [p + "zc", p + "root"], p + "w"),
        node("Mul", [p + "w", p + "w"], p + "w2"),
        node("ReduceSum", [p + "w2", p + "axis"], p + "maha_raw", keepdims=0),
        node("Div", [p + "maha_raw", p + "maha_scale"], p + "maha"),
        # the reconstruction (`back` undoes the whitening, if any, that `project` did)
        node("MatMul", [p + "z", p + "back"], p + "recon"),
        node("Sub", [p + "d", p + "recon"], p + "r"),
        node("Mul", [p + "r", p + "r"], p + "r2"),
        node("ReduceSum", [p + "r2", p + "axis"], p + "resid_raw", keepdims=0),
        node("Div", [p + "resid_raw", p + "resid_scale"], p + "resid"),
        node("Add", [p + "maha", p + "resid"], p + "sum"),
        node("Mul", [p + "sum", p + "half"], SCORE),
        node("Greater", [SCORE, p + "threshold"], FLAG),
    ]
    return nodes, inits


def output_infos() -> list[Any]:
    """The graph outputs ``ood_score`` [N] float and ``ood`` [N] bool."""
    from onnx import TensorProto, helper

    return [helper.make_tensor_value_info(SCORE, TensorProto.FLOAT, [None]),
            helper.make_tensor_value_info(FLAG, TensorProto.BOOL, [None])]


def add_ood(model: Any, flag: Any, features: str) -> Any:
    """Add the flag's nodes and its two outputs to `model` (an ``onnx.ModelProto`` with a
    float32 tensor `features`); returns the model."""
    nodes, inits = ood_nodes(flag, features)
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    model.graph.output.extend(output_infos())
    return model


def ood_to_onnx(flag: Any, dim: int) -> Any:
    """The flag alone as a model: ``features`` [N, dim] float32 in, ``ood_score``, ``ood``
    out."""
    import onnx
    from onnx import TensorProto, helper

    nodes, inits = ood_nodes(flag, "features")
    graph = helper.make_graph(
        nodes, "featsvm_ood",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, dim])],
        output_infos(), initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model
