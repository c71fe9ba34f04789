"""python -m anecy: the same as the ``anecy`` command."""
import sys

from .cli import anecy_main

sys.exit(anecy_main())
