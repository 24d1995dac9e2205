"""GRPO and TR-GRPO on Lightning.  Importing the package first sets CPU thread defaults (``trgrpo.threads``)."""

from trgrpo.threads import apply_thread_defaults

apply_thread_defaults()
