import sys

from lora_da.conformance.command import main

sys.exit(main())
