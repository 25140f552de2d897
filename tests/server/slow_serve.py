"""`infinity-serve serve` whose every batch takes HOLD_S seconds longer: a stand-in for a long batch
(the 2B at 1M) in shutdown tests of the real process. Usage: python -m tests.server.slow_serve HOLD_S ARGS..."""

from __future__ import annotations

import sys
import time

from server import cli, main


def _slow(build):
    def build_engine(settings, metrics=None, spec=None):
        engine, limits = build(settings, metrics, spec)
        engine.fault_hook = lambda requests: time.sleep(HOLD_S)
        return engine, limits

    return build_engine


if __name__ == "__main__":
    HOLD_S = float(sys.argv[1])
    main.build_engine = _slow(main.build_engine)
    sys.exit(cli.main(["serve", *sys.argv[2:]]))
