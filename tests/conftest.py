"""Hypothesis profiles: CI runs a fixed (derandomized) set of examples so that a
green run stays green; local runs explore new examples every time."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.register_profile("dev", print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
