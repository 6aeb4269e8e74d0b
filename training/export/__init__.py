"""From a run to a registered model: ONNX export with a parity check, graph composition, the registry."""
