"""The ``lora-da`` command line, a package laid out as ``accelerate``'s and
``transformers-cli``'s: a parser, and one library call per command.

* :mod:`lora_da.cli.parser` — :func:`build_parser` and :func:`main` (the
  ``lora-da`` entry point);
* :mod:`lora_da.cli.commands` — ``collect``, ``solve``, ``init``, ``report``, ``demo``;
* :mod:`lora_da.cli.models` — the model directory, loading, device checks;
* :mod:`lora_da.cli.outputs` — the output safety net (no overlap with an input,
  ``--overwrite`` only over what lora-da wrote, outputs written whole).

The data a command reads is :mod:`lora_da.data`; the report it writes and shows,
:mod:`lora_da.report`; its user error, :class:`lora_da.errors.CLIError`.
"""

from lora_da.cli.parser import PROG, build_parser, main

__all__ = ["PROG", "build_parser", "main"]
