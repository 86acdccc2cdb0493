"""`python -m lora_core ...`: the `lora-core` command (lora_core/cli.py)."""
import sys

from .cli import main

sys.exit(main())
