"""The data stages and the dataset they make: where photos come from (``sources``: the bucket
layout on S3 or a folder), ``ingest`` (fetch, verify, resume), ``validate`` (decode, check,
quarantine), ``split`` (by id hash), ``preprocess`` (resize and pack into webdataset shards,
``dataset.json``), ``shards`` (one id-space shard at a time, and the merge), ``report`` (the data
report), ``dataset`` (reading the packed shards back for training and evaluation) and
``bounded`` (reading input the stages did not write: files inside their folder, JSON within size
and nesting limits).

May import: ``bincounter.model`` (the transforms a dataset applies), ``bincounter.config`` and
the foundation modules. Never training, evaluation, serving, the registry or the stage
launchers.
"""
