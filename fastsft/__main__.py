import sys

from fastsft.cli import main

sys.exit(main())
