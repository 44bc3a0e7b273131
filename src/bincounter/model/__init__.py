"""What a trained counter is, for every layer that runs one: its spec and how its probabilities
read as an answer (``spec``), untrusted photos checked and transformed in numpy (``images``; with
``spec`` and ``calibration`` what the torch-free serving image uses), the networks (``networks``), the
photo transforms of training and evaluation (``transforms``), a loaded model with its spec that
counts a batch (``predictor``), its calibration and the verdict thresholds stored with it
(``calibration``), its ONNX export (``onnx_export``) and the device it runs on (``device``).

May import: ``bincounter.config`` and the foundation modules (``paths``, ``fileio``, ``ids``,
``tracking``, ``reporting``). Imported by data loading, training, evaluation, serving and the
registry; imports none of them.
"""
