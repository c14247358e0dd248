"""A fitted head (`featsvm.models.heads.FittedHead`) as an ONNX graph: ``features`` [N, dim]
float32 in, ``probabilities`` [N, 4] out, in the order of `featsvm.labels.LABELS`, equal to
`FittedHead.predict_proba`.

The scikit-learn part (StandardScaler, PCA, then the SVM or logistic regression) goes through
skl2onnx, the maintained converter, asked for the classifier's raw decision values
(``raw_scores``; for the SVM the same one-vs-rest aggregation of the one-vs-one votes that
scikit-learn's ``decision_function`` returns). featsvm's `KernelSVC` (an SVC on a
precomputed kernel) is handed over as the plain ``sklearn.svm.SVC`` it equals (`as_svc`:
same support vectors, dual coefficients, intercepts and gamma). The probability map is
appended as ONNX nodes: temperature scaling is softmax(decision / T) (scikit-learn's
``_TemperatureScaling``), an uncalibrated logistic regression is the softmax of its decision
values; then a fixed matrix puts the classes in LABELS order (0 for a class absent from train).
Heads calibrated with ``sigmoid`` or ``isotonic`` maps, and two-class heads, are refused.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np

from featsvm.errors import UsageError
from featsvm.labels import LABELS

INPUT = "features"
OUTPUT = "probabilities"
OPSET = 17
ML_OPSET = 3


def as_svc(kernel_svc: Any) -> Any:
    """The fitted ``sklearn.svm.SVC`` equal to a fitted `KernelSVC` (RBF or linear)."""
    svc = copy.deepcopy(kernel_svc.svc_)
    svc.kernel = kernel_svc.kernel
    svc.gamma = svc._gamma = float(getattr(kernel_svc, "gamma_", 0.0))
    svc.support_vectors_ = np.ascontiguousarray(kernel_svc.support_vectors_, dtype=np.float64)
    svc.shape_fit_ = (len(kernel_svc.support_vectors_), kernel_svc.n_features_in_)
    svc.n_features_in_ = kernel_svc.n_features_in_
    return svc


def _sklearn_part(fitted: Any) -> tuple[Any, Any, float | None]:
    """(pipeline skl2onnx can convert, its classifier, temperature or None)."""
    from sklearn.pipeline import Pipeline

    from featsvm.models.heads import KernelSVC, decision_estimator, temperature_of

    calibration = fitted.calibration
    if calibration not in ("temperature", "none"):
        raise UsageError(f"export handles heads calibrated by temperature (the default) or "
                         f"uncalibrated logistic regression, not {calibration!r}")
    temperature = temperature_of(fitted) if calibration == "temperature" else None
    if calibration == "temperature" and temperature is None:
        raise UsageError("the head's temperature cannot be read; refit it")
    pipe = decision_estimator(fitted)
    if len(pipe.classes_) < 3:
        raise UsageError("export handles heads of three or more classes")
    steps = []
    for name, step in pipe.steps:
        if step == "passthrough" or step is None:
            continue
        steps.append((name, as_svc(step) if isinstance(step, KernelSVC) else step))
    return Pipeline(steps), steps[-1][1], temperature


def head_to_onnx(fitted: Any, dim: int) -> Any:
    """The ONNX graph (``onnx.ModelProto``) of `fitted` for `dim`-wide features."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    pipe, clf, temperature = _sklearn_part(fitted)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # skl2onnx reads SVC.probA_ (empty)
        model = convert_sklearn(
            pipe, initial_types=[(INPUT, FloatTensorType([None, dim]))],
            options={id(clf): {"raw_scores": True, "zipmap": False}},
            target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET})
    for op in model.opset_import:  # skl2onnx declares the lowest opset its nodes need; the
        if op.domain in ("", "ai.onnx"):  # backbone graph it is joined to declares OPSET
            op.version = OPSET
    graph = model.graph
    scores = "head_scores"  # skl2onnx's own name for them is the one our output takes
    raw = next(o.name for o in graph.output if o.name != "label")
    for node in graph.node:
        node.output[:] = [scores if o == raw else o for o in node.output]
        node.input[:] = [scores if i == raw else i for i in node.input]
    classes = [str(c) for c in pipe.classes_]
    to_labels = np.zeros((len(classes), len(LABELS)), dtype=np.float32)
    for j, cls in enumerate(classes):
        to_labels[j, LABELS.index(cls)] = 1.0
    beta = np.array(1.0 if temperature is None else 1.0 / temperature, dtype=np.float32)
    graph.initializer.extend([numpy_helper.from_array(beta, "head_beta"),
                              numpy_helper.from_array(to_labels, "head_to_labels")])
    graph.node.extend([
        helper.make_node("Mul", [scores, "head_beta"], ["head_logits"]),
        helper.make_node("Softmax", ["head_logits"], ["head_class_proba"], axis=-1),
        helper.make_node("MatMul", ["head_class_proba", "head_to_labels"], [OUTPUT]),
    ])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT,
                                                      [None, len(LABELS)]))
    onnx.checker.check_model(model)
    return model
