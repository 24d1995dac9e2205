"""``python -m trgrpo fit --config configs/demo.yaml``

The package is imported before this module, so its CPU thread defaults (``trgrpo.threads``) are in the
environment before torch loads.
"""

from trgrpo.cli import main

if __name__ == "__main__":
    main()
