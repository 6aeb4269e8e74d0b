"""One ONNX graph from parts: a feature extractor feeding a scikit-learn estimator, or several models averaged.

The result keeps the contract of every exported MedZoo model: input ``pixels`` (float32 [N, C, H, W] in [0, 1],
dynamic batch), output ``logits`` whose softmax is the class probabilities. A classifier that gives
probabilities (an SVM, a forest) outputs their logarithm, as test-time augmentation does.
"""

from __future__ import annotations

import onnx
import onnx.version_converter
from onnx import TensorProto, helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType

from contract import INPUT_NAME, OUTPUT_NAME

FEATURES = "features"
ML_DOMAIN = "ai.onnx.ml"
ML_OPSET = 3
PROBABILITY_FLOOR = 1e-12  # log(0) would be -inf; the same floor as zoo.tta


def opset_of(proto: onnx.ModelProto, domain: str = "") -> int:
    return next(o.version for o in proto.opset_import if o.domain == domain)


def sklearn_graph(estimator, n_features: int, opset: int) -> onnx.ModelProto:
    """``features`` [N, D] -> ``probabilities`` [N, K] (no label output, no ZipMap)."""
    proto = convert_sklearn(
        estimator,
        initial_types=[(FEATURES, FloatTensorType([None, n_features]))],
        target_opset={"": opset, ML_DOMAIN: ML_OPSET},
        options={"zipmap": False},
    )
    graph = proto.graph
    probabilities = next(o for o in graph.output if o.name != "label")
    kept = [o for o in graph.output if o.name == probabilities.name]
    del graph.output[:]
    graph.output.extend(kept)
    return proto


def _log_output(probabilities: str, temperature: float) -> tuple[list, list]:
    """Nodes and initialisers from ``probabilities`` to ``logits``: their floored logarithm, divided by the
    calibration temperature when there is one (so the softmax of the output is the calibrated probability)."""
    initializers = [helper.make_tensor("probability_floor", TensorProto.FLOAT, [], [PROBABILITY_FLOOR])]
    log_name = OUTPUT_NAME if temperature == 1.0 else "log_probabilities"
    nodes = [
        helper.make_node("Max", [probabilities, "probability_floor"], ["floored_probabilities"]),
        helper.make_node("Log", ["floored_probabilities"], [log_name]),
    ]
    if temperature != 1.0:
        initializers.append(helper.make_tensor("temperature", TensorProto.FLOAT, [], [float(temperature)]))
        nodes.append(helper.make_node("Div", [log_name, "temperature"], [OUTPUT_NAME]))
    return nodes, initializers


def chain(
    extractor: onnx.ModelProto, classifier: onnx.ModelProto, metadata: dict[str, str], temperature: float = 1.0
) -> onnx.ModelProto:
    """``pixels`` -> extractor -> ``features`` -> classifier -> probabilities -> ``logits`` (log-probabilities,
    divided by ``temperature``)."""
    # skl2onnx writes the lowest opset its operators need; merging needs the extractor's.
    classifier = onnx.version_converter.convert_version(classifier, opset_of(extractor))
    classifier = onnx.compose.add_prefix(classifier, "classifier/")
    classifier.ir_version = extractor.ir_version
    merged = onnx.compose.merge_models(
        extractor, classifier, io_map=[(FEATURES, f"classifier/{FEATURES}")], doc_string="MedZoo features + estimator"
    )
    graph = merged.graph
    nodes, initializers = _log_output(graph.output[0].name, temperature)
    graph.initializer.extend(initializers)
    graph.node.extend(nodes)
    n_classes = graph.output[0].type.tensor_type.shape.dim[1]
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", n_classes.dim_value]))
    onnx.helper.set_model_props(merged, metadata)
    onnx.checker.check_model(merged, full_check=True)
    return merged


def average(
    members: list[onnx.ModelProto], weights: list[float], metadata: dict[str, str], temperature: float = 1.0
) -> onnx.ModelProto:
    """One graph that feeds ``pixels`` to every member and outputs log(sum_i w_i softmax(member_i(pixels))) / T."""
    opsets: dict[str, int] = {}
    for member in members:
        for entry in member.opset_import:
            opsets[entry.domain] = max(opsets.get(entry.domain, 0), entry.version)
    nodes, initializers, fused = [], [], []
    for i, member in enumerate(members):
        if opset_of(member) != opsets[""]:
            member = onnx.version_converter.convert_version(member, opsets[""])
        prefix = f"member{i}/"
        member = onnx.compose.add_prefix(member, prefix)
        pixels, logits = member.graph.input[0].name, member.graph.output[0].name
        for node in member.graph.node:
            node.input[:] = [INPUT_NAME if name == pixels else name for name in node.input]
        nodes.extend(member.graph.node)
        initializers.extend(member.graph.initializer)
        initializers.append(helper.make_tensor(f"{prefix}weight", TensorProto.FLOAT, [], [float(weights[i])]))
        nodes.extend(
            [
                helper.make_node("Softmax", [logits], [f"{prefix}probabilities"], axis=1),
                helper.make_node("Mul", [f"{prefix}probabilities", f"{prefix}weight"], [f"{prefix}weighted"]),
            ]
        )
        fused.append(f"{prefix}weighted")
    log_nodes, log_initializers = _log_output("probabilities", temperature)
    initializers.extend(log_initializers)
    nodes.extend([helper.make_node("Sum", fused, ["probabilities"]), *log_nodes])
    first = members[0].graph
    n_classes = first.output[0].type.tensor_type.shape.dim[1].dim_value
    graph = helper.make_graph(
        nodes,
        "medzoo_ensemble",
        [first.input[0]],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", n_classes])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid(domain, version) for domain, version in opsets.items()],
        producer_name="medzoo",
    )
    model.ir_version = max(m.ir_version for m in members)
    onnx.helper.set_model_props(model, metadata)
    onnx.checker.check_model(model, full_check=True)
    return model
