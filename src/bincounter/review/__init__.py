"""The review loop's page: people count the bins an audit doubted, one at a time, and every
answer is stored as a label with its lineage. ``app`` serves the page and its API, ``auth`` names
the reviewer of a request (a token per person, or an authenticating proxy's header),
``assignments`` decides which bin each person counts next. The answers' storage and what they add
up to are ``bincounter.data.reviews``; the queue file is ``bincounter.audit.review_queue``'s.

May import: ``bincounter.audit`` (the queue), ``bincounter.data`` (the photos, the answers),
``bincounter.config`` and the foundation modules; never training or model code.
"""
