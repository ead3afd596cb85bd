import sys

from d3kernels.cli import main

sys.exit(main())
