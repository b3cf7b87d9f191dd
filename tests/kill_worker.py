"""``python -m nb_edit ARGS...`` in this process, SIGKILLed right after its N-th checkpoint is committed.

    python tests/kill_worker.py N ARGS...

For tests/test_full_profile.py: a kill at a known point (no race with the next step), the way a
preempted job or an out-of-memory kill ends a run. The command itself runs unchanged.
"""

import os
import signal
import sys

from nb_edit import cli
from nb_edit.training import loop


def main() -> int:
    kill_after, args = int(sys.argv[1]), sys.argv[2:]
    save, saved = loop.save_checkpoint, []

    def save_then_die(*a, **k):
        path = save(*a, **k)
        saved.append(path)
        if len(saved) == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return path

    loop.save_checkpoint = save_then_die
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
