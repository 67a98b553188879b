"""`python -m connector.simulator`: the simulator as a server process."""

import sys

from connector.simulator.command import main

sys.exit(main())
