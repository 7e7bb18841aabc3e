import sys

from xentjax.cli import main

sys.exit(main())
