import sys

from pagehaul.cli import main

sys.exit(main())
