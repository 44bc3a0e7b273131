"""The model registry: ``register`` logs the serving model (an MLflow pyfunc, ``pyfunc``, with its
ONNX graph and model card), registers a version as challenger and moves the champion alias when
the promotion gate lets it.

May import: ``bincounter.model``, ``bincounter.config`` and the foundation modules (MLflow access
is ``bincounter.tracking``). Never data, training, evaluation or serving.
"""
