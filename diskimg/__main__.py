import sys

from diskimg.cli import main

sys.exit(main())
