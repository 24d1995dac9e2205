"""GRPO and TR-GRPO on Lightning.

Importing the package first sets CPU thread defaults (``trgrpo.threads``) and lets the old paths of modules
that moved into sub-packages still import (``trgrpo.moved``).
"""

from trgrpo import moved
from trgrpo.threads import apply_thread_defaults

apply_thread_defaults()
moved.install()
