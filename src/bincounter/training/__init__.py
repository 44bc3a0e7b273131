"""Training a counter: ``train`` (the loop: one process, torchrun or several GPUs; EMA,
checkpoints every epoch, resume, early stopping), ``tune`` (seeded random search, a child run per
trial), ``distill`` (trained teachers' soft targets) and ``checkpoints`` (local or s3:// copies a
restart resumes from).

May import: ``bincounter.evaluation`` (the metrics and plots each epoch is scored with),
``bincounter.data``, ``bincounter.model``, ``bincounter.config`` and the foundation modules. Never
serving (a server needs no training code) nor the stage launchers.
"""
