import sys

from andromeda.cli import main

sys.exit(main())
