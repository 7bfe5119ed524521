"""``python -m lora_da.cli``: the ``lora-da`` command."""

import sys

from lora_da.cli.parser import main

sys.exit(main())
