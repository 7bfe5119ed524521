"""The conformance kit: cases cut from real statistics, their exact
answers, and a checker that holds any implementation's ``A``/``B`` to SPEC §5's
tolerances (:mod:`lora_da.conformance.tolerances`, their one source).

Modules, in the order of the data: :mod:`~lora_da.conformance.cases` (recipes,
inputs, exact answers), :mod:`~lora_da.conformance.tolerances`,
:mod:`~lora_da.conformance.checker`, :mod:`~lora_da.conformance.export`;
:mod:`~lora_da.conformance.command` is the command line
(``python -m lora_da.conformance check RESULTS``, ``lora-da conformance``).
"""

from lora_da.conformance.cases import CASES, Case, Expected, Inputs, regenerate
from lora_da.conformance.checker import Report, check_results, read_results, result_key, solve_with_core
from lora_da.conformance.export import export, read_exported

__all__ = ["CASES", "Case", "Expected", "Inputs", "regenerate", "Report", "check_results", "read_results",
           "result_key", "solve_with_core", "export", "read_exported"]
