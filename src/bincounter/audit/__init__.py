"""Auditing a pod: ``pod`` counts every bin (in process or through a deployed server), compares
with the expected counts and resumes from its journal; ``outputs`` writes audit.csv,
audit.parquet, the errors file and the summary; ``report`` the HTML report for a person.

May import: ``bincounter.evaluation`` (the held-out calibration), ``bincounter.serving`` (the
client and the verdict), ``bincounter.data`` (the bucket layout), ``bincounter.config`` and the
foundation modules.
"""
