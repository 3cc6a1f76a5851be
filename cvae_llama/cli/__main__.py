"""`python -m cvae_llama.cli COMMAND ...`: the same as `python -m cvae_llama` and the `cvae-llama` console script."""

import sys

from . import main


if __name__ == "__main__":
    sys.exit(main())
