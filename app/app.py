"""Run the web demo from a checkout: `python app/app.py [sam-blocked demo flags]`.

The same as `sam-blocked demo`; the Blocks are built by sam_blocked.demo.ui.build_demo
(inside the package, so the installed command has them too) and this file only launches.
"""

import sys

from sam_blocked.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo", *sys.argv[1:]]))
