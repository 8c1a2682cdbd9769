import sys

from csfd.cli import main

sys.exit(main())
