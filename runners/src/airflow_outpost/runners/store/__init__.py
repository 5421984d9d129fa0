"""The region-local store: one root folder for corpora, embeddings, indexes, results and models.

* :mod:`.region_store`: ``Store`` (the layout) and the lineage records (hashes of inputs, models, code).
* :mod:`.atomic`: atomic publication (temp name, fsync, rename) of files and directories.
"""
