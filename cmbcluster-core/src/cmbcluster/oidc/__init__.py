"""OpenID Connect in core: a generic provider that Google- and Cognito-style plugins build on.

Import from :mod:`cmbcluster.oidc.provider` (this package stays empty so that loading the
built-in ``oidc`` plugin at start-up does not import httpx and joserfc).
"""
