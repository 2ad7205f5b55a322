import sys

from moekit.cli.commands import main

sys.exit(main())
