import sys

from bptt_jax.cli import main

sys.exit(main())
