"""python -m pvc_node_daemon --config FILE"""

import sys

from .cli import main

sys.exit(main())
