"""Save a pytest-xdist worker's coverage data when its tests end, not only at its exit.

Under ``coverage run`` with ``patch = subprocess`` (the repository's .coveragerc) every xdist worker
measures itself and writes its data when the interpreter exits; but pytest-xdist kills a worker that
takes more than 10 seconds to come down (execnet's ``terminate``), which a loaded machine reaches,
and a killed worker's data is lost: the tests it ran count as not run. Saving at the end of the
worker's session puts the data on disk before that countdown starts. Enabled in pytest.ini; it does
nothing outside an xdist worker or when coverage is not measuring.
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(trylast=True)  # after every other plugin's session end, so their code is measured too
def pytest_sessionfinish(session: pytest.Session) -> None:
    if not hasattr(session.config, "workerinput"):  # not an xdist worker: coverage saves at exit
        return
    try:
        from coverage import Coverage
    except ImportError:  # not installed: nothing is measured
        return
    measuring = Coverage.current()
    if measuring is not None:
        measuring.stop()
        measuring.save()
