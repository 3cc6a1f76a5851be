"""`python -m cvae_llama COMMAND ...`: the `cvae-llama` command line (also under `accelerate launch -m cvae_llama`)."""

import sys

from .cli import main


if __name__ == "__main__":
    sys.exit(main())
