"""What torchrun starts in tests/test_train_distributed.py: `python -m lora_core.train`'s main, with every file
write of the trainer (the LoRA / step files, the state) logged with the writing process's rank, so the test can
check that only rank 0 writes. Nothing else is changed: the writes still happen.

    torchrun --standalone --nproc_per_node=2 tests/dist_launch.py CONFIG --summary S.json
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora_core.train.loop as loop  # noqa: E402
from lora_core.train.__main__ import main  # noqa: E402

LOG = os.environ["LORA_CORE_WRITE_LOG"]


def logged(function, what):
    def wrapper(path, *args, **kwargs):
        with open(LOG, "a", encoding="utf-8") as handle:
            handle.write(f"{os.environ.get('RANK', '0')}\t{what}\t{os.path.basename(path)}\n")
        return function(path, *args, **kwargs)

    return wrapper


loop.save_lora = logged(loop.save_lora, "lora")
loop.save_state = logged(loop.save_state, "state")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
