import sys

from sam_blocked.cli import main

sys.exit(main())
