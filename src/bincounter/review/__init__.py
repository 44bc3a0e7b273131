"""The review loop's page: people count the bins an audit doubted, one at a time, and every
answer is stored as a label with its lineage (``bincounter.data.reviews``)."""
