import sys

from cifar_jax.cli import main

sys.exit(main())
