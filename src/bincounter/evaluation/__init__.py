"""Scoring a trained counter: ``evaluate`` (the test split as the server answers it, the shards
beside), ``metrics`` (accuracy, RMSE, per class, calibration figures), ``calibration`` (the
held-out reliability an audit reads back), ``compare`` (two models on the same photos, McNemar)
and ``plots``.

May import: ``bincounter.serving`` (evaluation scores the served path through the server's own
engine), ``bincounter.data``, ``bincounter.registry``, ``bincounter.model``, ``bincounter.config``
and the foundation modules. Never training: training imports the metrics and plots from here to
score its epochs.
"""
