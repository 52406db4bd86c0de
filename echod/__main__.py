"""``python -m echod`` behaves exactly like the ``echod`` command."""

from echod.cli import main

raise SystemExit(main())
