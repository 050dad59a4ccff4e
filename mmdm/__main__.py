import sys

from mmdm.cli import main

sys.exit(main())
