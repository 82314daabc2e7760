import sys

from spatialid.cli.main import main

sys.exit(main())
