"""The control plane's behaviour, independent of HTTP: each module one resource."""
