"""The built-in ``kubernetes`` compute backend: each environment is a Pod, a Service and a Secret.

- :mod:`~cmbcluster.kubernetes.plugin`: the registration and its settings;
- :mod:`~cmbcluster.kubernetes.backend`: the orchestration (start, stop, reconcile's listing);
- :mod:`~cmbcluster.kubernetes.manifests`: the objects of an environment, as JSON (pure code);
- :mod:`~cmbcluster.kubernetes.status`: an environment's status from its pod and events (pure);
- :mod:`~cmbcluster.kubernetes.routing`: Ingress and NetworkPolicy; :mod:`~.labels`, :mod:`~.rbac`;
- :mod:`~cmbcluster.kubernetes.client`, :mod:`~.watch`, :mod:`~.lease`: the API transport.

Only the transport modules (and the backend, through them) import the ``kubernetes`` client; the
plugin module, the manifests, the status rules, routing and RBAC stay importable without it.
"""
