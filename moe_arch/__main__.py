import sys

from moe_arch.cli import main

sys.exit(main())
