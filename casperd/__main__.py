import sys

from casperd.cli import main

sys.exit(main())
