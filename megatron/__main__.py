import sys

from megatron.cli import main

sys.exit(main())
