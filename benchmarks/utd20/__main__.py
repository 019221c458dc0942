"""Entry point of ``python -m benchmarks.utd20``: SIGTERM stops the campaign like Ctrl-C (finished units kept)."""

import signal
import sys

from .cli import main
from .runner import log


def _on_sigterm(signum, frame):  # pragma: no cover - exercised by killing the process
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:
        log(f"interrupted ({e}); finished units are kept, the running one resumes from its last checkpoint")
        sys.exit(130)
