"""Moving a deployment's buckets and database from one storage backend to another (``cmbcluster migrate``).

- :mod:`.copy`: the verified, streamed copy of objects between any two backends.
- :mod:`.manifest`: what has been copied and verified, in the database, so a migration resumes.
- :mod:`.engine`: plan, run (create, copy, switch) and finish (delete the sources).
- :mod:`.managed`: what every plugin's managed transfer (a cloud's transfer service) does the same
  way: polling its job, progress, timeout, failures; public, for plugins.
"""
