"""A third-party CMBCluster plugin."""
