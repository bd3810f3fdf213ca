"""Write helm/cmbcluster/files/rbac.json from cmbcluster/kubernetes/rbac.py (`./run nox -s helm-rbac`).

The chart reads its Role and ClusterRole rules from that file when the values give none;
`cmbcluster deploy` always passes the rules of the installed cmbcluster-core instead. A test
(tests/helm/test_chart.py) fails when the file and rbac.py differ.
"""

from __future__ import annotations

import json
from pathlib import Path

from cmbcluster.commands.deploy import rbac_values

TARGET = Path(__file__).resolve().parent / "cmbcluster" / "files" / "rbac.json"


def main() -> None:
    text = json.dumps(rbac_values(), indent=2) + "\n"
    changed = not TARGET.exists() or TARGET.read_text() != text
    TARGET.write_text(text)
    print(f"{TARGET}: {'updated' if changed else 'already current'}")


if __name__ == "__main__":
    main()
