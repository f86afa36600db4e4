import sys

from lcpass.cli import main

sys.exit(main())
