"""`python -m rest_jax.predict ...`: the former spelling of `python -m rest_jax predict ...` (kept working)."""

import sys

from rest_jax.inference import main

if __name__ == '__main__':
    sys.exit(main())
