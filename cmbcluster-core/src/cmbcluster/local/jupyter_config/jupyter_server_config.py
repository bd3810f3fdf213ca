"""JupyterLab's server on the embedded default: its file downloads (``/files/...``, the file browser's
Download) reach the buckets mounted in the home.

The embedded default mounts a bucket as a link from the home to the bucket's folder, and Tornado
(6.5.9 and later) serves no file through a link that leads out of the folder it serves: a download
from a bucket answered 403 (found by an outsider's trial). The folders the links lead to are
allowed too (CMBCLUSTER_BUCKET_FOLDERS, set by cmbcluster.local.compute). Jupyter's own check for
hidden files then gets the followed path, outside the home, and fails (500): it is made on the path
as asked for, inside the home. A container on Kubernetes mounts buckets in place: none of this.
"""

import inspect
import os

from jupyter_core.paths import is_hidden
from jupyter_server.base.handlers import AuthenticatedFileHandler
from tornado.web import HTTPError, StaticFileHandler


class BucketLinkFileHandler(AuthenticatedFileHandler):  # type: ignore[misc]  # (untyped where the jupyter extra is not installed)
    """Jupyter's file handler, whose hidden-file check reads the path below the home, not where a
    bucket's link leads (Tornado's own check decides which links may be followed)."""

    def validate_absolute_path(self, root: str, absolute_path: str) -> str:
        followed: str = StaticFileHandler.validate_absolute_path(self, root, absolute_path)
        if not self.contents_manager.allow_hidden and is_hidden(absolute_path, os.path.abspath(root)):
            raise HTTPError(404)
        return followed


c = get_config()  # type: ignore[name-defined]  # noqa: F821  (Jupyter's configuration loader provides it)
_buckets = [folder for folder in os.environ.get("CMBCLUSTER_BUCKET_FOLDERS", "").split(os.pathsep) if folder]
if _buckets and "allowed_symlink_directory" in inspect.signature(StaticFileHandler.initialize).parameters:
    _home = os.getcwd()  # the server's root: it starts in the environment's home
    c.FileContentsManager.files_handler_class = BucketLinkFileHandler
    c.FileContentsManager.files_handler_params = {"path": _home, "allowed_symlink_directory": [_home, *_buckets]}
