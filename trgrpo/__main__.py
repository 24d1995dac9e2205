"""``python -m trgrpo fit --config configs/demo.yaml``"""

from trgrpo.cli import main

if __name__ == "__main__":
    main()
