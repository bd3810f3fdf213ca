"""The built-in ``kubernetes`` compute backend: each environment is a Pod, a Service and a Secret.

Only :mod:`cmbcluster.kubernetes.backend` imports the ``kubernetes`` client; the plugin module
and :mod:`cmbcluster.kubernetes.rbac` stay importable without it.
"""
