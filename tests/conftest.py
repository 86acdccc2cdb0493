import sys
from pathlib import Path

# The repository root must be importable as the pack (nodes/, lora_core/) from tests.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
