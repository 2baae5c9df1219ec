import sys

from fastcd.cli import main

sys.exit(main())
