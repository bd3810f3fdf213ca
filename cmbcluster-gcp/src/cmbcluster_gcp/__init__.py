"""CMBCluster on Google Cloud. The plugin entry point is :mod:`cmbcluster_gcp.plugin`."""
