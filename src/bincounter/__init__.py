"""bincounter: count the items in warehouse bin photos.

The library, in packages by responsibility, each allowed to import only those below it
(docs/architecture.md; ``make test`` checks the rules with import-linter):

- ``cli``: the command line; ``launch``: the stage launchers the components and the CLI call;
- ``sagemaker``: training jobs and endpoints on SageMaker;
- ``audit`` and ``deploy``: auditing a pod; the deployment targets and their RBAC;
- ``training``; ``evaluation``; ``serving``; ``data``; ``registry``; ``model``;
- the foundation: ``config`` (every typed config), ``tracking`` (MLflow access), ``reporting``,
  ``paths``, ``fileio``, ``ids``.
"""

__version__ = "0.1.0"
