"""What you use around training: the server, ONNX export, hyper-parameter search, the LR finder,
explanations, evaluation reports and what quantization costs, the data report and the batch view."""
