"""gcp-storage-emulator, in memory on 127.0.0.1, for the benchmarks: the emulator the tests use, less
two costs of its own that Cloud Storage does not have and that made it, not the code measured, the
bottleneck of 10,000 small objects (bench_migrate.py measures both baselines and the copy against it):

- After every write (an object, an upload session, a bucket) it serializes the metadata of every
  object it holds to one JSON document (``Storage._write_config_to_file``), which persists it with
  ``-d DIR`` and is never read back in memory. Each upload cost time in proportion to the objects
  already stored: 116 uploads/s into an empty emulator, 23/s holding 5,000; 10,000 took quadratic
  time. In memory, it is not written.
- Its ``http.server`` answers one request at a time on HTTP/1.0 connections (one per request) with
  a listen backlog of 5: more clients connecting at once than that had SYNs dropped and waited out
  connect timeouts (60 s, seen at 10,000 uploads with 8 clients). The backlog is 128 here.

Everything else, the single thread included, is the emulator as shipped.

    python gcs_emulator.py PORT
"""

from __future__ import annotations

import sys
from http import server
from typing import Any

from gcp_storage_emulator.server import create_server
from gcp_storage_emulator.storage import Storage


def main() -> None:
    write_config = Storage._write_config_to_file

    def persist_on_disk_only(self: Any) -> None:
        if not self._use_memory_fs:
            write_config(self)

    Storage._write_config_to_file = persist_on_disk_only
    server.HTTPServer.request_queue_size = 128
    create_server("127.0.0.1", int(sys.argv[1]), in_memory=True).run()


if __name__ == "__main__":
    main()
