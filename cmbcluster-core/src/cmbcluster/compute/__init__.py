"""What every compute backend shares beside the interface: the application's command line and
the variables an environment gets (:mod:`cmbcluster.compute.command`), and how a start asks the
storage backend for a bucket's volume (:mod:`cmbcluster.compute.mounts`)."""
