"""Training and hosting on Amazon SageMaker: ``entry`` is the training contract inside the image
(``docker run <image> train``: /opt/ml, hyperparameters, several hosts, spot restarts), ``jobs``
builds and follows CreateTrainingJob, and ``steps`` are the SageMaker pipeline's two steps
(train as a job and record it in MLflow; host the registered model on an endpoint).

May import: ``bincounter.training`` (what the entry point runs), ``bincounter.deploy`` (the
endpoint target), ``bincounter.data``, ``bincounter.config`` and the foundation modules. Never the
stage launchers: the stage launchers call the steps.
"""
