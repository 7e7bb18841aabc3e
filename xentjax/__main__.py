import sys

from xentjax._cli import main

sys.exit(main())
