"""Example applications the embedded default's catalog runs (never imported by CMBCluster itself)."""
