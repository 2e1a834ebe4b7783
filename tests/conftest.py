"""Shared pytest setup."""

import pathlib
import sys

# Test helpers such as ``zoo`` are imported as top-level modules; make that independent of
# pytest's import mode and of whether tests/ ever becomes a package.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
