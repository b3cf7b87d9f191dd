import sys

from nb_edit.cli import main

sys.exit(main())
