"""CMBCluster on AWS. The plugin entry point is :mod:`cmbcluster_aws.plugin`."""
