"""Demo and test helpers, kept apart from the ``bincounter`` library: synthetic bin photos
(:mod:`bincounter_demo.synth`), a local S3 endpoint (:mod:`bincounter_demo.s3server`, moto's
server from the ``demo`` extra) and ``bincounter demo`` itself (:mod:`bincounter_demo.demo`).

This package uses the library; the library never imports it (only the CLI's ``synth``,
``s3-server`` and ``demo`` commands load it, when they run).
"""
