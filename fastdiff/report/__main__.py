"""``python -m fastdiff.report``: the command lives above the report, in report_cli."""

from fastdiff.report_cli import main

raise SystemExit(main())
