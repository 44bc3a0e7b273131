"""The model server (``python -m bincounter.serving``) and what talks to it.

``app`` composes the FastAPI app from its parts; ``worker`` runs the model (ONNX Runtime or
PyTorch) in worker processes fed by ``batching``'s micro-batching queue; ``metrics`` is its
Prometheus metrics and JSON access log; ``page`` the one-bin page (``static/``); ``verdict``
turns a probability into match / mismatch / unsure; ``client`` is the HTTP client the audit uses;
``credentials`` reads a SageMaker endpoint's MLflow credentials from Secrets Manager.

May import: ``bincounter.model``, ``bincounter.config`` and the foundation modules. Never
training, evaluation or data: the server holds no training code.
"""
