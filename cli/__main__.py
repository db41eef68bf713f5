"""`python -m fleetmind.cli`: the `fleetmind` program."""

import sys

from fleetmind.cli.main import main

sys.exit(main())
